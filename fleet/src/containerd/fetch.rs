//! Images fetched over HTTP: downloaded once into the cache, checked against their sha256.

use super::{io, Containerd, ContainerdError};
use crate::unit::{Image, UnitSpec};
use std::path::PathBuf;
use std::time::Duration;

impl Containerd {
    /// The archive of a unit's image on this machine (downloading it first for a URL).
    pub(super) async fn archive_of(
        &self,
        spec: &UnitSpec,
    ) -> Result<(PathBuf, Option<String>), ContainerdError> {
        match &spec.image {
            Image::Path { path, name } => Ok((PathBuf::from(path), name.clone())),
            Image::Url { url, sha256, name } => Ok((self.fetch(url, sha256).await?, name.clone())),
        }
    }

    /// Downloads an archive into the cache (once), checking its sha256 on the way.
    pub async fn fetch(&self, url: &str, sha256: &str) -> Result<PathBuf, ContainerdError> {
        use sha2::{Digest, Sha256};
        use tokio::io::AsyncWriteExt;
        let sha256 = sha256.to_ascii_lowercase();
        let dest = self.cache_dir.join(format!("{sha256}.oci.tar"));
        if dest.exists() {
            return Ok(dest);
        }
        tokio::fs::create_dir_all(&self.cache_dir)
            .await
            .map_err(io(&self.cache_dir))?;
        let fail = |message: String| ContainerdError::Fetch {
            url: url.to_string(),
            message,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let resp = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| fail(e.to_string()))?;
        let part = self
            .cache_dir
            .join(format!("{sha256}.part-{}", std::process::id()));
        let mut file = tokio::fs::File::create(&part).await.map_err(io(&part))?;
        let mut hasher = Sha256::new();
        let mut body = resp;
        while let Some(chunk) = body.chunk().await.map_err(|e| fail(e.to_string()))? {
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io(&part))?;
        }
        file.flush().await.map_err(io(&part))?;
        drop(file);
        let got = hex::encode(hasher.finalize());
        if got != sha256 {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(fail(format!("sha256 is {got}, the unit says {sha256}")));
        }
        tokio::fs::rename(&part, &dest).await.map_err(io(&dest))?;
        Ok(dest)
    }
}
