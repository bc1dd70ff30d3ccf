//! Structure-aware mutation for the fuzz targets in `tests/parsers.rs`.
//!
//! Every parser of outside input is fed a real document (a seed under `seeds/`, the shape the
//! daemon meets in production: `iptables-save` output, Envoy admin JSON, API pods, xDS
//! listeners, HTTP responses, the TOML pod list) changed by a generated list of edits. Random
//! bytes alone almost never get past a parser's first token; edits to a real document reach the
//! code that handles each field. Under `cargo bolero test` (libFuzzer) the same targets are
//! coverage-guided: the engine mutates the edit list itself.

use bolero::generator::TypeGenerator;
use serde_json::Value;

/// One change to a document.
#[derive(Clone, Debug, TypeGenerator)]
pub enum Edit {
    /// Delete up to `len` bytes at `at`.
    Delete { at: u32, len: u8 },
    /// Insert raw bytes at `at`.
    Insert { at: u32, bytes: Vec<u8> },
    /// Overwrite bytes at `at`.
    Overwrite { at: u32, bytes: Vec<u8> },
    /// Insert one of the target's interesting tokens at `at`.
    Token { at: u32, which: u8 },
    /// Repeat the `len` bytes at `at` `times` times (long lines, many rules, deep nesting).
    Repeat { at: u32, len: u8, times: u8 },
    /// Cut the document at `at` (a truncated read).
    Truncate { at: u32 },
    /// Put one of the target's tokens at the start of a line, or in its place (line-based
    /// formats: a value where the parser expects one, such as a chunk size or a rule).
    Line { line: u16, which: u8, replace: bool },
}

/// A value that replaces one node of a JSON document.
#[derive(Clone, Debug, TypeGenerator)]
pub enum Hostile {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
    /// A string of this many kilobytes.
    LongStr(u8),
    /// An array nested this many levels deep.
    Deep(u8),
    EmptyArray,
    EmptyObject,
    /// The node's own value, twice in an array.
    Doubled,
}

/// Changes to one node of a JSON document, found by walking `path` (each step picks a child by
/// index modulo the node's size).
#[derive(Clone, Debug, TypeGenerator)]
pub struct JsonEdit {
    pub path: Vec<u16>,
    pub value: Hostile,
}

/// At most this many byte edits, and JSON edits, are applied from one input: a generated list
/// is often long, and thirty random edits leave little of a document for the parser to reach
/// into. A few edits to a real document is what finds bugs.
pub const MAX_EDITS: usize = 4;
pub const MAX_JSON_EDITS: usize = 2;

/// A fuzz input: which seed, then its changes.
#[derive(Clone, Debug, TypeGenerator)]
pub struct Mutation {
    pub seed: u8,
    pub json: Vec<JsonEdit>,
    pub edits: Vec<Edit>,
}

impl Mutation {
    /// The seed this input starts from.
    pub fn pick<'a>(&self, seeds: &[&'a [u8]]) -> &'a [u8] {
        seeds[usize::from(self.seed) % seeds.len()]
    }

    /// The seed with the byte edits applied.
    pub fn bytes(&self, seeds: &[&[u8]], tokens: &[&str]) -> Vec<u8> {
        let mut doc = self.pick(seeds).to_vec();
        apply(&mut doc, self.edits(), tokens);
        doc
    }

    fn edits(&self) -> &[Edit] {
        &self.edits[..self.edits.len().min(MAX_EDITS)]
    }

    /// The seed, parsed as JSON, with the JSON edits and then the byte edits applied. None when
    /// the bytes no longer form JSON (the target then feeds the text itself, if it reads text).
    pub fn json(&self, seeds: &[&[u8]], tokens: &[&str]) -> (Vec<u8>, Option<Value>) {
        let mut value: Value = serde_json::from_slice(self.pick(seeds)).expect("seeds are JSON");
        for e in self.json.iter().take(MAX_JSON_EDITS) {
            replace(&mut value, &e.path, &e.value);
        }
        let mut doc = serde_json::to_vec(&value).expect("a Value serialises");
        if self.edits().is_empty() {
            return (doc, Some(value));
        }
        apply(&mut doc, self.edits(), tokens);
        let parsed = serde_json::from_slice(&doc).ok();
        (doc, parsed)
    }
}

/// Applies `edits` to `doc` in order. Offsets wrap to the document's length, so every edit
/// lands somewhere.
pub fn apply(doc: &mut Vec<u8>, edits: &[Edit], tokens: &[&str]) {
    // Inputs stay far below the daemon's own limits, so a target's run stays short; the limits
    // themselves are tested with real oversized inputs in the accelerator's tests.
    const MAX: usize = 1 << 20;
    for e in edits {
        let at = |at: u32, len: usize| (at as usize) % (len + 1);
        match e {
            Edit::Delete { at: a, len } => {
                let start = at(*a, doc.len());
                let end = (start + usize::from(*len)).min(doc.len());
                doc.drain(start..end);
            }
            Edit::Insert { at: a, bytes } => {
                let start = at(*a, doc.len());
                doc.splice(start..start, bytes.iter().copied());
            }
            Edit::Overwrite { at: a, bytes } => {
                let start = at(*a, doc.len());
                for (i, b) in bytes.iter().enumerate() {
                    match doc.get_mut(start + i) {
                        Some(slot) => *slot = *b,
                        None => doc.push(*b),
                    }
                }
            }
            Edit::Token { at: a, which } => {
                if tokens.is_empty() {
                    continue;
                }
                let start = at(*a, doc.len());
                let token = tokens[usize::from(*which) % tokens.len()].as_bytes();
                doc.splice(start..start, token.iter().copied());
            }
            Edit::Repeat { at: a, len, times } => {
                let start = at(*a, doc.len());
                let end = (start + usize::from(*len)).min(doc.len());
                let piece = doc[start..end].to_vec();
                if piece.len() * usize::from(*times) + doc.len() > MAX {
                    continue;
                }
                for _ in 0..*times {
                    doc.splice(end..end, piece.iter().copied());
                }
            }
            Edit::Truncate { at: a } => {
                let end = at(*a, doc.len());
                doc.truncate(end);
            }
            Edit::Line {
                line,
                which,
                replace,
            } => {
                if tokens.is_empty() {
                    continue;
                }
                let starts: Vec<usize> = std::iter::once(0)
                    .chain(
                        doc.iter()
                            .enumerate()
                            .filter(|(_, b)| **b == b'\n')
                            .map(|(i, _)| i + 1),
                    )
                    .collect();
                let start = starts[usize::from(*line) % starts.len()];
                let end = if *replace {
                    doc[start..]
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(doc.len(), |n| start + n)
                } else {
                    start
                };
                let token = tokens[usize::from(*which) % tokens.len()].as_bytes();
                doc.splice(start..end, token.iter().copied());
            }
        }
        if doc.len() > MAX {
            doc.truncate(MAX);
        }
    }
}

/// Replaces the node at `path` (indices taken modulo each node's size; the walk stops at a
/// leaf) with `with`.
pub fn replace(node: &mut Value, path: &[u16], with: &Hostile) {
    if let Some((step, rest)) = path.split_first() {
        let step = usize::from(*step);
        let child = match node {
            Value::Array(a) if !a.is_empty() => {
                let n = a.len();
                a.get_mut(step % n)
            }
            Value::Object(o) if !o.is_empty() => {
                let n = o.len();
                o.values_mut().nth(step % n)
            }
            _ => None,
        };
        if let Some(child) = child {
            return replace(child, rest, with);
        }
    }
    *node = hostile(with, node);
}

fn hostile(h: &Hostile, old: &Value) -> Value {
    match h {
        Hostile::Null => Value::Null,
        Hostile::Bool(b) => Value::Bool(*b),
        Hostile::Int(i) => Value::from(*i),
        Hostile::Uint(u) => Value::from(*u),
        // NaN and infinities have no JSON form; serde_json turns them into null.
        Hostile::Float(f) => Value::from(*f),
        Hostile::Str(s) => Value::String(s.clone()),
        Hostile::LongStr(k) => Value::String("x".repeat(usize::from(*k) * 1024)),
        Hostile::Deep(n) => {
            let mut v = Value::Null;
            for _ in 0..*n {
                v = Value::Array(vec![v]);
            }
            v
        }
        Hostile::EmptyArray => Value::Array(Vec::new()),
        Hostile::EmptyObject => Value::Object(serde_json::Map::new()),
        Hostile::Doubled => Value::Array(vec![old.clone(), old.clone()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_land_and_stay_in_bounds() {
        let mut doc = b"abcdef".to_vec();
        apply(
            &mut doc,
            &[
                Edit::Delete { at: 1, len: 2 },
                Edit::Insert {
                    at: 100,
                    bytes: b"XY".to_vec(),
                },
                Edit::Token { at: 0, which: 1 },
                Edit::Repeat {
                    at: 0,
                    len: 1,
                    times: 2,
                },
            ],
            &["-j", "!"],
        );
        // "abcdef" -> "adef" -> at 100 % 5 = 0: "XYadef" -> "!XYadef" -> "!!!XYadef"
        assert_eq!(doc, b"!!!XYadef");
        apply(&mut doc, &[Edit::Truncate { at: 3 }], &[]);
        assert_eq!(doc, b"!!!");
        let mut doc = b"a\nb\nc".to_vec();
        let line = |line, replace| Edit::Line {
            line,
            which: 0,
            replace,
        };
        apply(&mut doc, &[line(1, true), line(5, false)], &["X"]);
        // Line 1 replaced; 5 % 3 lines = line 2, prefixed.
        assert_eq!(doc, b"a\nX\nXc");
    }

    #[test]
    fn json_edits_replace_the_node_on_the_path() {
        let mut v: Value = serde_json::json!({"a": [1, {"b": 2}], "c": 3});
        replace(&mut v, &[0, 1, 0], &Hostile::Deep(2));
        assert_eq!(v, serde_json::json!({"a": [1, {"b": [[null]]}], "c": 3}));
        replace(&mut v, &[1], &Hostile::Doubled);
        assert_eq!(v["c"], serde_json::json!([3, 3]));
    }
}
