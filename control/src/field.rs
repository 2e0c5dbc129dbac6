//! Field errors in the Kubernetes apiserver's words, so a rejected manifest
//! reads exactly like `kubectl` users expect:
//! `The Service "web" is invalid: spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive`.

use std::fmt;

/// A value shown in an error: strings quoted, numbers bare.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Shown {
    Str(String),
    Int(i64),
    Raw(String),
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shown::Str(s) => write!(f, "{s:?}"),
            Shown::Int(i) => write!(f, "{i}"),
            Shown::Raw(s) => f.write_str(s),
        }
    }
}

impl From<&str> for Shown {
    fn from(s: &str) -> Self {
        Shown::Str(s.to_string())
    }
}

impl From<&String> for Shown {
    fn from(s: &String) -> Self {
        Shown::Str(s.clone())
    }
}

impl From<i32> for Shown {
    fn from(i: i32) -> Self {
        Shown::Int(i64::from(i))
    }
}

impl From<i64> for Shown {
    fn from(i: i64) -> Self {
        Shown::Int(i)
    }
}

/// One field error (k8s.io/apimachinery/pkg/util/validation/field).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FieldError {
    Required(String, String),
    Invalid(String, Shown, String),
    Duplicate(String, Shown),
    Forbidden(String, String),
    NotSupported(String, Shown, Vec<String>),
    TooLong(String, usize),
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldError::Required(p, d) if d.is_empty() => write!(f, "{p}: Required value"),
            FieldError::Required(p, d) => write!(f, "{p}: Required value: {d}"),
            FieldError::Invalid(p, v, d) => write!(f, "{p}: Invalid value: {v}: {d}"),
            FieldError::Duplicate(p, v) => write!(f, "{p}: Duplicate value: {v}"),
            FieldError::Forbidden(p, d) => write!(f, "{p}: Forbidden: {d}"),
            FieldError::NotSupported(p, v, ok) => {
                let ok: Vec<String> = ok.iter().map(|s| format!("{s:?}")).collect();
                write!(
                    f,
                    "{p}: Unsupported value: {v}: supported values: {}",
                    ok.join(", ")
                )
            }
            FieldError::TooLong(p, max) => {
                write!(f, "{p}: Too long: may not be more than {max} bytes")
            }
        }
    }
}

/// Collects field errors while walking an object.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    pub fn required(&mut self, path: impl Into<String>, detail: impl Into<String>) {
        self.0
            .push(FieldError::Required(path.into(), detail.into()));
    }
    pub fn invalid(&mut self, path: impl Into<String>, v: impl Into<Shown>, d: impl Into<String>) {
        self.0
            .push(FieldError::Invalid(path.into(), v.into(), d.into()));
    }
    pub fn duplicate(&mut self, path: impl Into<String>, v: impl Into<Shown>) {
        self.0.push(FieldError::Duplicate(path.into(), v.into()));
    }
    pub fn forbidden(&mut self, path: impl Into<String>, d: impl Into<String>) {
        self.0.push(FieldError::Forbidden(path.into(), d.into()));
    }
    pub fn not_supported(&mut self, path: impl Into<String>, v: &str, ok: &[&str]) {
        self.0.push(FieldError::NotSupported(
            path.into(),
            v.into(),
            ok.iter().map(|s| s.to_string()).collect(),
        ));
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Kubernetes' aggregate form: one error bare, several in brackets.
pub fn aggregate(errors: &[FieldError]) -> String {
    match errors {
        [one] => one.to_string(),
        many => {
            let parts: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

// --- name and value rules (k8s.io/apimachinery/pkg/util/validation) ---

const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

fn is_label_body(s: &str, first_alpha: bool) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    !b.is_empty()
        && b.iter().all(ok)
        && (if first_alpha {
            b[0].is_ascii_lowercase()
        } else {
            b[0] != b'-'
        })
        && b[b.len() - 1] != b'-'
}

/// Problems with `s` as a DNS-1035 label (Service names).
pub fn dns1035_label(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push("must be no more than 63 characters".to_string());
    }
    if !is_label_body(s, true) {
        out.push(DNS1035_MSG.to_string());
    }
    out
}

/// Problems with `s` as a DNS-1123 label (namespaces, port names).
pub fn dns1123_label(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push("must be no more than 63 characters".to_string());
    }
    if !is_label_body(s, false) {
        out.push(DNS1123_LABEL_MSG.to_string());
    }
    out
}

/// Problems with `s` as a DNS-1123 subdomain (Pod, Node, slice names).
pub fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 253 {
        out.push("must be no more than 253 characters".to_string());
    }
    if s.is_empty() || !s.split('.').all(|l| is_label_body(l, false)) {
        out.push(DNS1123_SUBDOMAIN_MSG.to_string());
    }
    out
}

/// Problems with `s` as an IANA service name (a named port).
pub fn iana_svc_name(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 15 {
        out.push("must be no more than 15 characters".to_string());
    }
    let b = s.as_bytes();
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        out.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".into());
    }
    if s.contains("--") {
        out.push("must not contain consecutive hyphens".into());
    }
    if !b.iter().any(|c| c.is_ascii_lowercase()) {
        out.push("must contain at least one letter (a-z)".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        out.push("must not begin or end with a hyphen".into());
    }
    out
}

fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Problems with `s` as a label key (`[prefix/]name`).
pub fn label_key(s: &str) -> Vec<String> {
    const MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let mut out = Vec::new();
    if let Some(p) = prefix {
        for e in dns1123_subdomain(p) {
            out.push(format!("prefix part {e}"));
        }
    }
    if name.len() > 63 {
        out.push("name part must be no more than 63 characters".into());
    } else if !is_qualified_name_part(name) {
        out.push(MSG.into());
    }
    out
}

/// Problems with `s` as a label value.
pub fn label_value(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    if s.len() > 63 {
        return vec!["must be no more than 63 characters".into()];
    }
    if !is_qualified_name_part(s) {
        return vec!["a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".into()];
    }
    Vec::new()
}

/// Validates a label map at `path`.
pub fn labels(errs: &mut Errors, path: &str, map: &std::collections::BTreeMap<String, String>) {
    for (k, v) in map {
        for e in label_key(k) {
            errs.invalid(path, k, e);
        }
        for e in label_value(v) {
            errs.invalid(format!("{path}[{k}]"), v, e);
        }
    }
}

/// Kubernetes' limit on an object's annotations, keys and values together.
pub const TOTAL_ANNOTATION_BYTES: usize = 256 * 1024;

/// Validates an annotation map at `path` (apimachinery's
/// `ValidateAnnotations`): each key a qualified name, case aside, and keys
/// and values together at most [`TOTAL_ANNOTATION_BYTES`].
pub fn annotations(
    errs: &mut Errors,
    path: &str,
    map: &std::collections::BTreeMap<String, String>,
) {
    for k in map.keys() {
        // Lower-cased only when it has to be: this runs on every write.
        let key = if k.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(k.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(k.as_str())
        };
        for e in label_key(&key) {
            errs.invalid(path, k.as_str(), e);
        }
    }
    let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > TOTAL_ANNOTATION_BYTES {
        errs.0
            .push(FieldError::TooLong(path.into(), TOTAL_ANNOTATION_BYTES));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(dns1035_label("backend-svc").is_empty());
        assert!(!dns1035_label("1abc").is_empty());
        assert!(dns1123_label("1abc").is_empty());
        assert!(!dns1035_label("Web").is_empty());
        assert!(!dns1035_label(&"a".repeat(64)).is_empty());
        assert!(dns1123_subdomain("mydb.amazonaws.com").is_empty());
        assert!(!dns1123_subdomain("bad..name").is_empty());
        assert!(iana_svc_name("http").is_empty());
        assert!(!iana_svc_name("8080").is_empty());
        assert!(!iana_svc_name("a--b").is_empty());
        assert!(label_key("app.kubernetes.io/name").is_empty());
        assert!(!label_key("-bad").is_empty());
        assert!(label_value("").is_empty());
        assert!(!label_value("bad value").is_empty());
    }

    #[test]
    fn annotation_rules() {
        let check = |map: &[(&str, String)]| {
            let mut errs = Errors::default();
            let map = map
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            annotations(&mut errs, "metadata.annotations", &map);
            aggregate(&errs.0)
        };
        // Keys and values count together; the limit itself is allowed.
        let at_limit = "x".repeat(TOTAL_ANNOTATION_BYTES - 1);
        assert_eq!(check(&[("a", at_limit.clone())]), "[]");
        assert_eq!(
            check(&[("a", at_limit), ("b", String::new())]),
            "metadata.annotations: Too long: may not be more than 262144 bytes"
        );
        assert_eq!(check(&[("Example.COM/Some_Key", "v".into())]), "[]");
        assert!(
            check(&[("bad key", String::new())])
                .starts_with("metadata.annotations: Invalid value: \"bad key\": name part must")
        );
    }

    #[test]
    fn wording() {
        let e = FieldError::Invalid(
            "spec.ports[0].port".into(),
            Shown::Int(0),
            "must be between 1 and 65535, inclusive".into(),
        );
        assert_eq!(
            e.to_string(),
            "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"
        );
        let n = FieldError::NotSupported(
            "spec.type".into(),
            "Foo".into(),
            vec!["ClusterIP".into(), "NodePort".into()],
        );
        assert_eq!(
            n.to_string(),
            "spec.type: Unsupported value: \"Foo\": supported values: \"ClusterIP\", \"NodePort\""
        );
        assert_eq!(
            aggregate(&[e.clone(), e.clone()])
                .matches("Invalid")
                .count(),
            2
        );
    }
}
