//! Byte offsets of kernel struct fields, read from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`), for the programs' BTF-typed reads: Rust eBPF has no CO-RE field
//! relocations, so the loader finds each offset on the running kernel and hands it to the
//! programs as a read-only global, which the verifier then checks against the same BTF.
//!
//! Only what that needs is parsed (type names, struct and union members); the format is the
//! kernel's `Documentation/bpf/btf.rst`. Nothing here trusts the blob: every read is bounded,
//! and a malformed blob is an error, never a panic.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// One struct or union member: its name, type id and bit offset.
#[derive(Clone, Copy, Debug)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    members: Vec<Member>,
}

/// The types of one BTF blob, by id (id 0 is `void`).
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<(String, u32), u32>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> Result<Btf, String> {
        let path = "/sys/kernel/btf/vmlinux";
        let blob = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        Btf::parse(&blob).map_err(|e| format!("{path}: {e}"))
    }

    pub fn parse(blob: &[u8]) -> Result<Btf, String> {
        let bad = |what: &str| format!("malformed BTF: {what}");
        if u16_at(blob, 0) != Some(MAGIC) {
            return Err(bad("no BTF magic (or another byte order)"));
        }
        let hdr_len = u32_at(blob, 4).ok_or_else(|| bad("header"))? as usize;
        let field = |i: usize| u32_at(blob, 8 + 4 * i).map(|v| v as usize);
        let (type_off, type_len, str_off, str_len) = match (field(0), field(1), field(2), field(3))
        {
            (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
            _ => return Err(bad("header")),
        };
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            blob.get(start..start.checked_add(len)?)
        };
        let types_blob = section(type_off, type_len).ok_or_else(|| bad("type section"))?;
        let strings = section(str_off, str_len)
            .ok_or_else(|| bad("string section"))?
            .to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < types_blob.len() {
            let (Some(name), Some(info)) = (u32_at(types_blob, at), u32_at(types_blob, at + 4))
            else {
                return Err(bad("truncated type"));
            };
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfield_offsets = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let base = at + 12 * m;
                        let (Some(name), Some(ty), Some(off)) = (
                            u32_at(types_blob, base),
                            u32_at(types_blob, base + 4),
                            u32_at(types_blob, base + 8),
                        ) else {
                            return Err(bad("truncated member"));
                        };
                        // With kind_flag, the low 24 bits are the bit offset and the high 8 the
                        // bitfield size.
                        let bit_offset = if bitfield_offsets {
                            off & 0xff_ffff
                        } else {
                            off
                        };
                        members.push(Member {
                            name,
                            ty,
                            bit_offset,
                        });
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                _ => 0,
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT || t.kind == KIND_UNION {
                let name = btf.name(t.name).to_string();
                if !name.is_empty() {
                    btf.by_name.entry((name, t.kind)).or_insert(id as u32);
                }
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// The byte offset of `field` in `struct name`, looking through anonymous struct and union
    /// members as C does.
    pub fn field_offset(&self, name: &str, field: &str) -> Result<u32, String> {
        let id = self
            .by_name
            .get(&(name.to_string(), KIND_STRUCT))
            .ok_or_else(|| format!("no struct {name} in the kernel's BTF"))?;
        self.find(*id, field, 0, 0)
            .ok_or_else(|| format!("struct {name} has no field {field}"))
    }

    fn find(&self, id: u32, field: &str, base_bits: u32, depth: u32) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            let bits = base_bits.checked_add(m.bit_offset)?;
            if m.name == 0 {
                let inner = self.types.get(m.ty as usize)?;
                if inner.kind == KIND_STRUCT || inner.kind == KIND_UNION {
                    if let Some(off) = self.find(m.ty, field, bits, depth + 1) {
                        return Some(off);
                    }
                }
            } else if self.name(m.name) == field {
                // A bitfield member is not byte-addressable: not a field the programs can read.
                return (bits % 8 == 0).then_some(bits / 8);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob with `struct s { int a; union { int pad; struct { int b; }; }; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0pad\0b\0".to_vec();
        let (int, s, a, pad, b) = (1u32, 5u32, 7u32, 9u32, 13u32);
        let mut types = Vec::new();
        let mut t = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_ne_bytes());
            }
        };
        // 1: int
        t(&[int, KIND_INT << 24, 4, 32]);
        // 2: struct { int b; } (anonymous)
        t(&[0, (KIND_STRUCT << 24) | 1, 4, b, 1, 0]);
        // 3: union { int pad; struct {...}; } (anonymous)
        t(&[0, (KIND_UNION << 24) | 2, 4, pad, 1, 0, 0, 2, 0]);
        // 4: struct s { int a; union ...; }
        t(&[s, (KIND_STRUCT << 24) | 2, 8, a, 1, 0, 0, 3, 32]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_ne_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_ne_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_fields_through_anonymous_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.field_offset("s", "a"), Ok(0));
        assert_eq!(btf.field_offset("s", "pad"), Ok(4));
        assert_eq!(btf.field_offset("s", "b"), Ok(4));
        assert!(btf
            .field_offset("s", "c")
            .unwrap_err()
            .contains("no field c"));
        assert!(btf
            .field_offset("t", "a")
            .unwrap_err()
            .contains("no struct t"));
    }

    #[test]
    fn malformed_blobs_are_errors() {
        let good = blob();
        for cut in 0..good.len() {
            // Every truncation either parses (cut inside the string section) or is refused.
            let _ = Btf::parse(&good[..cut]);
        }
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn the_running_kernel_has_the_tcp_fields_the_programs_read() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("no kernel BTF here; skipped");
            return;
        };
        for f in ["write_seq", "snd_nxt", "data_segs_out"] {
            let off = btf.field_offset("tcp_sock", f).unwrap();
            assert!(off > 0 && off % 4 == 0, "tcp_sock.{f} at {off}");
        }
    }
}
