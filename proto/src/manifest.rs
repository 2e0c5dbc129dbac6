//! Kubernetes manifests (multi-document YAML or JSON, `kind: List`
//! included) to typed objects, with errors that say which document, which
//! field and where: the CLI and the node agent's static mode both read them.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Kind;
use crate::v1::Object;

/// Largest document accepted, like the server's object limit.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// YAML syntax error (the message carries line and column).
    #[error("error parsing YAML: {0}")]
    Yaml(String),
    /// JSON syntax error.
    #[error("error parsing JSON at line {line}, column {column}: {msg}")]
    Json {
        line: usize,
        column: usize,
        msg: String,
    },
    /// A document without `apiVersion`/`kind`, or of a kind Strait lacks.
    #[error("document {doc}: {msg}")]
    Type { doc: usize, msg: String },
    /// A field that does not fit the kind's schema (unknown, wrong type).
    #[error("document {doc} ({kind} {name:?}): error decoding {path}: {msg}")]
    Field {
        doc: usize,
        kind: Kind,
        name: String,
        path: String,
        msg: String,
    },
    /// A document over the size limit.
    #[error(
        "document {doc} ({kind} {name:?}) is {size} bytes, larger than the {MAX_DOCUMENT_BYTES}-byte limit"
    )]
    TooLarge {
        doc: usize,
        kind: Kind,
        name: String,
        size: usize,
    },
}

/// Parses every object in `text`.
pub fn parse(text: &str) -> Result<Vec<Object>, ManifestError> {
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut out = Vec::new();
        let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        for v in stream {
            let v = v.map_err(|e| ManifestError::Json {
                line: e.line(),
                column: e.column(),
                msg: e.to_string(),
            })?;
            match v {
                Value::Array(items) => out.extend(items),
                v => out.push(v),
            }
        }
        out
    } else {
        serde_saphyr::from_multiple::<Value>(text)
            .map_err(|e| ManifestError::Yaml(e.to_string()))?
    };
    let mut objects = Vec::new();
    let mut doc = 0;
    for v in docs {
        if v.is_null() {
            continue;
        }
        doc += 1;
        if v.get("kind").and_then(Value::as_str) == Some("List") {
            let items = v
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                objects.push(object(doc, item)?);
            }
        } else {
            objects.push(object(doc, v)?);
        }
    }
    Ok(objects)
}

fn typed<T: DeserializeOwned>(
    doc: usize,
    kind: Kind,
    name: &str,
    v: Value,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(v).map_err(|e| ManifestError::Field {
        doc,
        kind,
        name: name.to_string(),
        path: e.path().to_string(),
        msg: e.inner().to_string(),
    })
}

/// One document to an object.
pub fn object(doc: usize, v: Value) -> Result<Object, ManifestError> {
    let Some(map) = v.as_object() else {
        return Err(ManifestError::Type {
            doc,
            msg: "a manifest document must be a mapping".into(),
        });
    };
    let api = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind_s = map.get("kind").and_then(Value::as_str).unwrap_or("");
    if api.is_empty() || kind_s.is_empty() {
        let missing = if api.is_empty() { "apiVersion" } else { "kind" };
        return Err(ManifestError::Type {
            doc,
            msg: format!("Object '{missing}' is missing"),
        });
    }
    let kind = match Kind::ALL.iter().find(|k| k.as_str() == kind_s) {
        Some(k) if k.api_version() == api => *k,
        _ => {
            return Err(ManifestError::Type {
                doc,
                msg: format!("no matches for kind {kind_s:?} in version {api:?}"),
            });
        }
    };
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let size = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(0);
    if size > MAX_DOCUMENT_BYTES {
        return Err(ManifestError::TooLarge {
            doc,
            kind,
            name,
            size,
        });
    }
    Ok(match kind {
        Kind::Service => typed::<crate::v1::Service>(doc, kind, &name, v)?.into(),
        Kind::Pod => typed::<crate::v1::Pod>(doc, kind, &name, v)?.into(),
        Kind::Node => typed::<crate::v1::Node>(doc, kind, &name, v)?.into(),
        Kind::EndpointSlice => typed::<crate::v1::EndpointSlice>(doc, kind, &name, v)?.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 80\n    targetPort: http\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {app: web}\n";
        let objs = parse(text).expect("parse");
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].kind(), Some(Kind::Service));
        assert_eq!(objs[1].name(), "p");
    }

    #[test]
    fn unknown_field_names_the_path() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 80\n    protocl: TCP\n";
        let e = parse(text).expect_err("unknown field").to_string();
        assert!(e.contains("spec.ports[0]"), "{e}");
        assert!(e.contains("protocl"), "{e}");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("apiVersion: v1\nkind: Service\nmetadata: [\n")
            .expect_err("bad")
            .to_string();
        assert!(e.contains("line") || e.contains(':'), "{e}");
    }

    #[test]
    fn unknown_kind() {
        let e = parse("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
            .expect_err("kind");
        assert!(
            e.to_string()
                .contains("no matches for kind \"Deployment\" in version \"apps/v1\"")
        );
    }

    #[test]
    fn json_and_list() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"}}]}"#;
        let objs = parse(text).expect("parse");
        assert_eq!(objs[0].kind(), Some(Kind::Node));
    }
}
