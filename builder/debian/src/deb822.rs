//! The control-file syntax shared by Packages, InRelease and `.sources` files: paragraphs of
//! `Field: value` lines separated by blank lines, with continuation lines indented.

/// One paragraph; values borrow from the parsed text (multi-line values keep their line breaks).
#[derive(Debug, Default)]
pub(crate) struct Paragraph<'a> {
    fields: Vec<(&'a str, &'a str)>,
    /// 1-based line where the paragraph starts.
    pub line: usize,
}

impl<'a> Paragraph<'a> {
    /// The value of a field, matched case-insensitively.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// Splits `text` into paragraphs. Lines starting with `#` are comments; lines without a colon
/// outside a field are ignored.
pub(crate) fn paragraphs(text: &str) -> Vec<Paragraph<'_>> {
    let mut out = Vec::new();
    let mut cur = Paragraph::default();
    // (key, value start, value end) of the field being read.
    let mut open: Option<(&str, usize, usize)> = None;
    let mut offset = 0;
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        let start = offset;
        offset += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            close_field(text, &mut cur, &mut open);
            if !cur.fields.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(field) = open.as_mut() {
                field.2 = start + line.len();
            }
            continue;
        }
        close_field(text, &mut cur, &mut open);
        if cur.fields.is_empty() {
            cur.line = n + 1;
        }
        if let Some(colon) = line.find(':') {
            open = Some((line[..colon].trim(), start + colon + 1, start + line.len()));
        }
    }
    close_field(text, &mut cur, &mut open);
    if !cur.fields.is_empty() {
        out.push(cur);
    }
    out
}

fn close_field<'a>(
    text: &'a str,
    cur: &mut Paragraph<'a>,
    open: &mut Option<(&'a str, usize, usize)>,
) {
    if let Some((key, start, end)) = open.take() {
        cur.fields.push((key, text[start..end].trim()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_continuations_and_comments() {
        let text = "# comment\nPackage: a\nDepends: b,\n c (>= 1)\nDescription: x\n more\n .\n\n\n\
                    Package: d\r\nVersion: 1\r\n";
        let ps = paragraphs(text);
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].get("package"), Some("a"));
        assert_eq!(ps[0].get("Depends"), Some("b,\n c (>= 1)"));
        assert_eq!(ps[0].get("Description"), Some("x\n more\n ."));
        assert_eq!(ps[0].line, 2);
        assert_eq!(ps[1].get("Version"), Some("1"));
        assert_eq!(ps[1].line, 10);
        assert_eq!(ps[1].get("Depends"), None);
    }
}
