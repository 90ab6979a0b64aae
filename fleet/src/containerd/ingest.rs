//! Blobs from a registry into containerd's content store: an ingest per digest
//! (`caisson-pull-<digest>`) that containerd checks at commit, resumed from its offset with a
//! `Range` request after a broken connection, dropped when containerd refuses what it got.

use super::archive;
use super::pull::pull_error;
use super::{call, found, Conn, Containerd, ContainerdError};
use crate::distribution::Repository;
use containerd_client::services::v1 as api;
use containerd_client::tonic::Code;
use std::collections::HashMap;

/// How many times one blob is resumed after its connection broke, within one pull.
const RESUMES: u32 = 5;

impl Containerd {
    /// Writes a blob held in memory (a manifest or config, already checked).
    pub(super) async fn write_bytes(
        &self,
        conn: &Conn,
        desc: &archive::Descriptor,
        bytes: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let msg = api::WriteContentRequest {
            action: api::WriteAction::Commit as i32,
            r#ref: format!("caisson-pull-{}", desc.digest),
            total: bytes.len() as i64,
            expected: desc.digest.clone(),
            offset: 0,
            data: bytes.to_vec(),
            labels,
        };
        let sent = self
            .send_content(conn, &desc.digest, futures_util::stream::iter([msg]))
            .await;
        match sent {
            Err(e) if e.code() == Some(Code::AlreadyExists) => Ok(()),
            other => other,
        }
    }

    /// Streams a blob from the registry into the content store, resuming from what the
    /// ingest holds after a broken connection.
    pub(super) async fn write_from_registry(
        &self,
        conn: &Conn,
        repo: &Repository,
        desc: &archive::Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let ingest = format!("caisson-pull-{}", desc.digest);
        let size = desc.size as u64;
        let mut resumes = 0;
        loop {
            let offset = self.ingest_offset(conn, &ingest).await?.min(size);
            let (resp, start) = repo
                .blob(&desc.digest, offset)
                .await
                .map_err(pull_error(&repo.reference.whole()))?;
            let (tx, rx) = tokio::sync::mpsc::channel::<api::WriteContentRequest>(4);
            let producer = tokio::spawn(produce(
                resp,
                start,
                offset,
                size,
                WriteHead {
                    ingest: ingest.clone(),
                    digest: desc.digest.clone(),
                    labels: labels.clone(),
                },
                tx,
            ));
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            let written = self.send_content(conn, &desc.digest, stream).await;
            let produced = producer.await.unwrap_or_else(|e| Err(e.to_string()));
            match (written, produced) {
                (Err(e), _) if e.code() == Some(Code::AlreadyExists) => return Ok(()),
                (Ok(()), Ok(())) => return Ok(()),
                (Err(e), Ok(())) => {
                    // The whole blob was sent and containerd refused it: its digest or size
                    // is wrong. Drop the ingest so nothing of it stays.
                    self.abort_ingest(conn, &ingest).await;
                    return Err(ContainerdError::Refused {
                        reference: repo.reference.whole(),
                        message: format!("blob {} refused: {e}", desc.digest),
                    });
                }
                (_, Err(cut)) if resumes < RESUMES => {
                    resumes += 1;
                    log::info!(
                        "image {}: blob {}: {cut}; resuming ({resumes}/{RESUMES})",
                        repo.reference.whole(),
                        desc.digest
                    );
                }
                (_, Err(cut)) => {
                    return Err(ContainerdError::Pull {
                        reference: repo.reference.whole(),
                        message: format!("blob {}: {cut}", desc.digest),
                    })
                }
            }
        }
    }

    async fn send_content(
        &self,
        conn: &Conn,
        digest: &str,
        stream: impl futures_util::Stream<Item = api::WriteContentRequest> + Send + 'static,
    ) -> Result<(), ContainerdError> {
        let mut responses = conn
            .content()
            .write(conn.req(stream))
            .await
            .map_err(call("content write", digest))?
            .into_inner();
        while responses
            .message()
            .await
            .map_err(call("content write", digest))?
            .is_some()
        {}
        Ok(())
    }

    /// How many bytes the ingest `r#ref` holds (0 when there is none).
    async fn ingest_offset(&self, conn: &Conn, ingest: &str) -> Result<u64, ContainerdError> {
        let st = found(
            conn.content()
                .status(conn.req(api::StatusRequest {
                    r#ref: ingest.to_string(),
                }))
                .await
                .map_err(call("content status", ingest)),
        )?;
        Ok(st
            .and_then(|s| s.into_inner().status)
            .map_or(0, |s| s.offset.max(0) as u64))
    }

    async fn abort_ingest(&self, conn: &Conn, ingest: &str) {
        let r = conn
            .content()
            .abort(conn.req(api::AbortRequest {
                r#ref: ingest.to_string(),
            }))
            .await;
        if let Err(e) = r {
            if e.code() != Code::NotFound {
                log::warn!("containerd: dropping ingest {ingest}: {}", e.message());
            }
        }
    }
}

/// What every write message of a blob carries.
struct WriteHead {
    ingest: String,
    digest: String,
    labels: HashMap<String, String>,
}

/// Reads a blob's answer (whose body starts at `start`) and sends write messages from
/// `offset` on, the commit last; an error says where the connection broke.
async fn produce(
    mut resp: reqwest::Response,
    start: u64,
    offset: u64,
    size: u64,
    head: WriteHead,
    tx: tokio::sync::mpsc::Sender<api::WriteContentRequest>,
) -> Result<(), String> {
    let msg = |action: api::WriteAction, at: u64, data: Vec<u8>| api::WriteContentRequest {
        action: action as i32,
        r#ref: head.ingest.clone(),
        total: size as i64,
        expected: head.digest.clone(),
        offset: at as i64,
        data,
        labels: if action == api::WriteAction::Commit {
            head.labels.clone()
        } else {
            HashMap::new()
        },
    };
    // `pos`: the blob offset of the next body byte; `at`: of the next byte to send.
    let (mut pos, mut at) = (start, offset);
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err(format!("the connection broke at byte {at} of {size}: {e}")),
        };
        let end = pos + chunk.len() as u64;
        if end > size {
            return Err(format!("the registry sent more than its {size} bytes"));
        }
        if end > at {
            let skip = (at - pos) as usize;
            let data = chunk[skip..].to_vec();
            let n = data.len() as u64;
            if tx
                .send(msg(api::WriteAction::Write, at, data))
                .await
                .is_err()
            {
                return Ok(()); // containerd ended the stream: its error is reported there
            }
            at += n;
        }
        pos = end;
    }
    if at < size {
        return Err(format!("the answer ended at byte {at} of {size}"));
    }
    let _ = tx.send(msg(api::WriteAction::Commit, at, Vec::new())).await;
    Ok(())
}
