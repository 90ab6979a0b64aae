//! `/etc/os-release` (really `/usr/lib/os-release`) of a Caisson image.

/// The `ID` of every Caisson image.
pub const ID: &str = "caisson";
/// Where the file lives in the root; `/etc/os-release` links to it.
pub const PATH: &str = "/usr/lib/os-release";

/// The fields the builder writes and the updater reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsRelease {
    /// The image name (`IMAGE_ID`), e.g. `host`.
    pub image_id: String,
    /// The image version (`IMAGE_VERSION` and `VERSION_ID`).
    pub version: String,
}

/// A missing field in an os-release file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("os-release has no {0} field")]
pub struct MissingField(pub &'static str);

impl OsRelease {
    /// The file's text.
    pub fn render(&self) -> String {
        format!(
            "NAME=\"Caisson\"\nID={ID}\nPRETTY_NAME=\"Caisson {v} ({img})\"\nVERSION_ID={v}\n\
             IMAGE_ID={img}\nIMAGE_VERSION={v}\nHOME_URL=\"https://caisson.invalid/\"\n",
            v = self.version,
            img = self.image_id
        )
    }

    /// Reads the fields back from the file's text.
    pub fn parse(text: &str) -> Result<Self, MissingField> {
        let field = |key: &'static str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
                .ok_or(MissingField(key))
        };
        Ok(OsRelease {
            image_id: field("IMAGE_ID")?,
            version: field("IMAGE_VERSION")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let o = OsRelease {
            image_id: "host".into(),
            version: "1.2.0".into(),
        };
        let text = o.render();
        assert!(text.contains("ID=caisson\n"));
        assert!(text.contains("VERSION_ID=1.2.0\n"));
        assert_eq!(OsRelease::parse(&text), Ok(o));
        assert_eq!(OsRelease::parse("ID=x\n"), Err(MissingField("IMAGE_ID")));
    }
}
