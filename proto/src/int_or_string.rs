//! Kubernetes' `IntOrString` (a port number or an IANA port name) in its JSON
//! form: a bare number or a bare string, never a tagged object.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::v1::IntOrString;
use crate::v1::int_or_string::Value;

impl IntOrString {
    /// A numeric port.
    pub fn int(v: i32) -> Self {
        Self {
            value: Some(Value::IntVal(v)),
        }
    }

    /// A named port.
    pub fn string(v: impl Into<String>) -> Self {
        Self {
            value: Some(Value::StrVal(v.into())),
        }
    }
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(Value::IntVal(v)) => write!(f, "{v}"),
            Some(Value::StrVal(s)) => f.write_str(s),
            None => Ok(()),
        }
    }
}

impl Serialize for IntOrString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.value {
            Some(Value::IntVal(v)) => s.serialize_i32(*v),
            Some(Value::StrVal(v)) => s.serialize_str(v),
            None => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::int)
                    .map_err(|_| E::custom(format!("{v} does not fit in a 32-bit integer")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::int)
                    .map_err(|_| E::custom(format!("{v} does not fit in a 32-bit integer")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::string(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_forms() {
        let n: IntOrString = serde_json::from_str("5678").expect("int");
        assert_eq!(n, IntOrString::int(5678));
        let s: IntOrString = serde_json::from_str("\"http\"").expect("str");
        assert_eq!(s, IntOrString::string("http"));
        assert_eq!(serde_json::to_string(&n).expect("ser"), "5678");
        assert!(serde_json::from_str::<IntOrString>("{}").is_err());
        assert!(serde_json::from_str::<IntOrString>("99999999999").is_err());
    }
}
