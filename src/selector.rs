//! Label selectors for `get -l`, in Kubernetes' syntax — equality-based
//! (`app=web`, `tier!=db`) and set-based (`env in (a,b)`, `env notin (c)`,
//! `canary`, `!canary`) — matched on the client against the objects a list
//! or watch returns.

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{anyhow, bail};
use strait_control::field::{label_key, label_value};

/// Every requirement must hold (they are ANDed, as in Kubernetes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Whether `o`'s labels satisfy every requirement.
    pub fn selects(&self, o: &strait_proto::v1::Object) -> bool {
        let none = BTreeMap::new();
        self.matches(o.metadata().map_or(&none, |m| &m.labels))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| {
            let value = labels.get(&r.key);
            match &r.op {
                Op::In(values) => value.is_some_and(|v| values.contains(v)),
                // As in Kubernetes: an object without the key matches `!=`
                // and `notin`.
                Op::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
            }
        })
    }
}

impl FromStr for Selector {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let mut out = Vec::new();
        for term in split_terms(s)? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            out.push(
                requirement(term)
                    .map_err(|e| anyhow!("unable to parse requirement: {term:?}: {e}"))?,
            );
        }
        Ok(Selector(out))
    }
}

/// The comma-separated terms of `s`; commas inside `( … )` belong to a set.
fn split_terms(s: &str) -> anyhow::Result<Vec<&str>> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| anyhow!("unable to parse selector {s:?}: unmatched ')'"))?
            }
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        bail!("unable to parse selector {s:?}: unmatched '('");
    }
    terms.push(&s[start..]);
    Ok(terms)
}

fn requirement(term: &str) -> anyhow::Result<Requirement> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement {
            key: key_of(key.trim())?,
            op: Op::DoesNotExist,
        });
    }
    if let Some((key, values)) = set(term, " notin ")? {
        return Ok(Requirement {
            key,
            op: Op::NotIn(values),
        });
    }
    if let Some((key, values)) = set(term, " in ")? {
        return Ok(Requirement {
            key,
            op: Op::In(values),
        });
    }
    for (sep, negated) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = term.split_once(sep) {
            let values = vec![value_of(value.trim())?];
            return Ok(Requirement {
                key: key_of(key.trim())?,
                op: if negated {
                    Op::NotIn(values)
                } else {
                    Op::In(values)
                },
            });
        }
    }
    Ok(Requirement {
        key: key_of(term)?,
        op: Op::Exists,
    })
}

/// `KEY in (A, B)` split at `op` (" in " or " notin "), if `term` is one.
fn set(term: &str, op: &str) -> anyhow::Result<Option<(String, Vec<String>)>> {
    let Some((key, rest)) = term.split_once(op) else {
        return Ok(None);
    };
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| anyhow!("expected a list of values in parentheses"))?;
    let values = inner
        .split(',')
        .map(|v| value_of(v.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if values.iter().all(String::is_empty) {
        bail!("for 'in', 'notin' operators, values set can't be empty");
    }
    Ok(Some((key_of(key.trim())?, values)))
}

fn key_of(key: &str) -> anyhow::Result<String> {
    match label_key(key).into_iter().next() {
        None => Ok(key.to_string()),
        Some(e) => bail!("invalid label key {key:?}: {e}"),
    }
}

fn value_of(value: &str) -> anyhow::Result<String> {
    match label_value(value).into_iter().next() {
        None => Ok(value.to_string()),
        Some(e) => bail!("invalid label value: {value:?}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equality_and_set_requirements_are_anded() {
        let web = labels(&[("app", "web"), ("env", "prod")]);
        let db = labels(&[("app", "db"), ("canary", "")]);
        let cases = [
            ("app=web", true, false),
            ("app==web", true, false),
            ("app!=web", false, true),
            ("env!=prod", false, true), // no key: != matches
            ("app in (web, db)", true, true),
            ("app notin (web)", false, true),
            ("env notin (prod)", false, true),
            ("canary", false, true),
            ("!canary", true, false),
            ("app=web,env=prod", true, false),
            ("app in (web,db),!canary", true, false),
            ("", true, true),
        ];
        for (sel, want_web, want_db) in cases {
            let s: Selector = sel.parse().expect(sel);
            assert_eq!(s.matches(&web), want_web, "{sel} on web");
            assert_eq!(s.matches(&db), want_db, "{sel} on db");
        }
    }

    #[test]
    fn bad_selectors_name_the_requirement() {
        for (sel, want) in [
            (
                "app=we b",
                "unable to parse requirement: \"app=we b\": invalid label value",
            ),
            (
                "a b",
                "unable to parse requirement: \"a b\": invalid label key",
            ),
            ("app in web", "expected a list of values in parentheses"),
            ("app in (a", "unmatched '('"),
            ("app in ()", "values set can't be empty"),
        ] {
            let err = sel.parse::<Selector>().expect_err(sel).to_string();
            assert!(err.contains(want), "{sel}: {err}");
        }
    }
}
