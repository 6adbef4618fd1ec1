//! A small, bounded XML reader for the few fields read from query-protocol answers
//! (STS, EC2, CloudWatch, IAM).

use quick_xml::events::Event;
use quick_xml::Reader;

/// Limits of the parser; inputs are already bounded by the HTTP body limit.
const MAX_INPUT: usize = 4 * 1024 * 1024;
const MAX_DEPTH: usize = 32;
const MAX_ELEMENTS: usize = 100_000;

/// An element: local name, its text content, and child elements. Attributes are dropped;
/// AWS query-protocol answers do not use them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct XmlNode {
    /// The local name (namespace prefix removed).
    pub name: String,
    /// The concatenated text directly inside this element, entities resolved.
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<XmlNode>,
}

impl XmlNode {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&XmlNode> {
        self.children.iter().find(|c| c.name == name)
    }

    /// All children named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a XmlNode> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Follows a path of child names.
    pub fn path(&self, names: &[&str]) -> Option<&XmlNode> {
        names.iter().try_fold(self, |node, name| node.child(name))
    }

    /// The text of the child at `names`.
    pub fn text_at(&self, names: &[&str]) -> Option<&str> {
        self.path(names).map(|n| n.text.as_str())
    }

    /// The first descendant named `name`, depth first (this node included).
    pub fn find(&self, name: &str) -> Option<&XmlNode> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }

    /// The items of an AWS list: `<name><item>…</item>…</name>` or `<name><member>…`.
    pub fn items<'a>(&'a self, list: &str) -> impl Iterator<Item = &'a XmlNode> + 'a {
        self.child(list)
            .into_iter()
            .flat_map(|l| l.children.iter())
            .filter(|c| c.name == "item" || c.name == "member")
    }
}

/// Parses `input` into its root element.
pub fn parse(input: &[u8]) -> Result<XmlNode, String> {
    if input.len() > MAX_INPUT {
        return Err(format!("XML document larger than {MAX_INPUT} bytes"));
    }
    let mut reader = Reader::from_reader(input);
    reader.config_mut().trim_text(true);
    let mut stack: Vec<XmlNode> = Vec::new();
    let mut elements = 0usize;
    let mut buf = Vec::new();
    loop {
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| format!("invalid XML at byte {}: {e}", reader.buffer_position()))?;
        match event {
            Event::Start(e) | Event::Empty(e) if stack.len() >= MAX_DEPTH => {
                let _ = e;
                return Err(format!("XML nested deeper than {MAX_DEPTH}"));
            }
            Event::Start(e) => {
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(format!("XML has more than {MAX_ELEMENTS} elements"));
                }
                stack.push(XmlNode {
                    name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                    ..XmlNode::default()
                });
            }
            Event::Empty(e) => {
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(format!("XML has more than {MAX_ELEMENTS} elements"));
                }
                let node = XmlNode {
                    name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                    ..XmlNode::default()
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => return Ok(node),
                }
            }
            Event::End(_) => {
                let node = stack.pop().ok_or("unbalanced XML end tag")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => return Ok(node),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let text = t.decode().map_err(|e| format!("invalid XML text: {e}"))?;
                    top.text.push_str(&text);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::GeneralRef(r) => {
                if let Some(top) = stack.last_mut() {
                    if let Some(c) = r.resolve_char_ref().map_err(|e| e.to_string())? {
                        top.text.push(c);
                    } else {
                        let name = r.decode().map_err(|e| e.to_string())?;
                        let resolved = quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("unknown XML entity &{name};"))?;
                        top.text.push_str(resolved);
                    }
                }
            }
            Event::Eof => return Err("XML document ended early".into()),
            // Declarations, comments, processing instructions, doctypes carry nothing we read.
            _ => {}
        }
        buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sts_answer() {
        let doc = br#"<?xml version="1.0"?>
<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:iam::123456789012:user/a&amp;b</Arn>
    <UserId>AIDA&#65;</UserId>
    <Account>123456789012</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#;
        let root = parse(doc).unwrap();
        assert_eq!(
            root.text_at(&["GetCallerIdentityResult", "Arn"]),
            Some("arn:aws:iam::123456789012:user/a&b")
        );
        assert_eq!(
            root.text_at(&["GetCallerIdentityResult", "UserId"]),
            Some("AIDAA")
        );
        assert_eq!(root.find("RequestId").map(|n| n.text.as_str()), Some("r-1"));
    }

    #[test]
    fn rejects_deep_and_broken_documents() {
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(parse(deep.as_bytes()).is_err());
        assert!(parse(b"<a><b></a>").is_err());
        assert!(parse(b"<a>").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"<a>&unknown;</a>").is_err());
    }
}
