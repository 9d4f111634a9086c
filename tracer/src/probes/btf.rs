//! Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) to find struct
//! field offsets and enum values: the raw bytes and one index entry per
//! type, nothing decoded ahead (a full parse costs ten times the memory).
//! Read once at start-up, dropped once the offsets are known.
//!
//! Format: include/uapi/linux/btf.h. A header, then the type section (each
//! type a `struct btf_type` of 12 bytes followed by kind-specific data),
//! then the string section (NUL-terminated names, referred to by offset).
use anyhow::{bail, Context, Result};

const MAGIC: u16 = 0xeb9f;

/// BTF kinds (BTF_KIND_*).
mod kind {
    pub const INT: u32 = 1;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

pub struct Btf {
    data: Vec<u8>,
    /// Byte offset in `data` of each type, by id (id 0 is void).
    types: Vec<usize>,
    strings: std::ops::Range<usize>,
}

/// One `struct btf_type`.
#[derive(Clone, Copy, Debug)]
pub struct Type {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// Where the kind-specific data starts.
    body: usize,
}

impl Btf {
    pub fn from_file(path: &str) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        Self::parse(data).with_context(|| format!("cannot parse {path}"))
    }

    pub fn parse(data: Vec<u8>) -> Result<Self> {
        let u32_at = |at: usize| -> Result<u32> {
            let bytes = data.get(at..at + 4).context("truncated header")?;
            Ok(u32::from_ne_bytes(bytes.try_into()?))
        };
        if data.len() < 24 || u16::from_ne_bytes([data[0], data[1]]) != MAGIC {
            bail!("not BTF of this machine's byte order");
        }
        let header_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = header_len + type_off;
        let types_end = types_start + type_len;
        let strings = header_len + str_off..header_len + str_off + str_len;
        if types_end > data.len() || strings.end > data.len() {
            bail!("sections run past the end");
        }
        let mut btf = Self {
            data,
            types: vec![0],
            strings,
        };
        let mut at = types_start;
        while at < types_end {
            btf.types.push(at);
            let ty = btf.type_at(at).context("truncated type")?;
            at = ty.body + btf.body_len(&ty)?;
        }
        Ok(btf)
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(
            self.data.get(at..at + 4)?.try_into().ok()?,
        ))
    }

    fn type_at(&self, at: usize) -> Option<Type> {
        let info = self.u32_at(at + 4)?;
        Some(Type {
            name_off: self.u32_at(at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(at + 8)?,
            body: at + 12,
        })
    }

    /// Bytes of kind-specific data after the 12-byte `struct btf_type`.
    fn body_len(&self, ty: &Type) -> Result<usize> {
        Ok(match ty.kind {
            kind::INT | kind::VAR | kind::DECL_TAG => 4,
            kind::ARRAY => 12,
            kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * ty.vlen,
            kind::ENUM | kind::FUNC_PROTO => 8 * ty.vlen,
            0..=19 => 0,
            other => bail!("unknown BTF kind {other}"),
        })
    }

    pub fn by_id(&self, id: u32) -> Option<Type> {
        self.type_at(*self.types.get(id as usize)?)
    }

    pub fn name(&self, name_off: u32) -> &str {
        let start = self.strings.start + name_off as usize;
        let bytes = self.data.get(start..self.strings.end).unwrap_or_default();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or_default()
    }

    pub fn type_name(&self, ty: &Type) -> &str {
        self.name(ty.name_off)
    }

    pub fn types(&self) -> impl Iterator<Item = Type> + '_ {
        (1..self.types.len() as u32).filter_map(|id| self.by_id(id))
    }

    /// The struct named `name` that has members (not a forward declaration).
    pub fn struct_named(&self, name: &str) -> Option<Type> {
        self.types()
            .find(|ty| ty.kind == kind::STRUCT && ty.vlen > 0 && self.type_name(ty) == name)
    }

    /// The type under typedefs and qualifiers.
    pub fn peel(&self, mut id: u32) -> Option<Type> {
        for _ in 0..32 {
            let ty = self.by_id(id)?;
            match ty.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// (name, type id, bit offset) of each member of a struct or union.
    pub fn members(&self, ty: &Type) -> impl Iterator<Item = (&str, u32, u32)> + '_ {
        let composite = ty.kind == kind::STRUCT || ty.kind == kind::UNION;
        let (body, count, bitfields) = (ty.body, if composite { ty.vlen } else { 0 }, ty.kind_flag);
        (0..count).filter_map(move |i| {
            let at = body + 12 * i;
            let offset = self.u32_at(at + 8)?;
            Some((
                self.name(self.u32_at(at)?),
                self.u32_at(at + 4)?,
                if bitfields {
                    offset & 0x00ff_ffff
                } else {
                    offset
                },
            ))
        })
    }

    pub fn is_composite(ty: &Type) -> bool {
        ty.kind == kind::STRUCT || ty.kind == kind::UNION
    }

    /// (name, value) of each enumerator of an enum (the low 32 bits of an
    /// ENUM64's).
    pub fn enumerators(&self, ty: &Type) -> impl Iterator<Item = (&str, u32)> + '_ {
        let step = match ty.kind {
            kind::ENUM => 8,
            kind::ENUM64 => 12,
            _ => 0,
        };
        let (body, count) = (ty.body, if step == 0 { 0 } else { ty.vlen });
        (0..count).filter_map(move |i| {
            let at = body + step * i;
            Some((self.name(self.u32_at(at)?), self.u32_at(at + 4)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made BTF: int, struct outer { int a; union { int b; }; },
    /// the anonymous union, and enum e { X = 7 }.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0e\0X\0";
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types: Vec<u32> = Vec::new();
        // 1: int (size 4), INT data
        types.extend([name("int"), kind::INT << 24, 4, 32]);
        // 2: struct outer, 2 members, size 8
        types.extend([name("outer"), kind::STRUCT << 24 | 2, 8]);
        types.extend([name("a"), 1, 0]);
        types.extend([0, 3, 32]);
        // 3: union (anonymous), 1 member
        types.extend([0, kind::UNION << 24 | 1, 4]);
        types.extend([name("b"), 1, 0]);
        // 4: enum e, 1 enumerator
        types.extend([name("e"), kind::ENUM << 24 | 1, 4]);
        types.extend([name("X"), 7]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut data = Vec::new();
        data.extend(MAGIC.to_ne_bytes());
        data.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            data.extend(v.to_ne_bytes());
        }
        data.extend(type_bytes);
        data.extend(strings);
        data
    }

    #[test]
    fn types_members_and_enumerators_are_read_from_the_raw_bytes() {
        let btf = Btf::parse(sample()).unwrap();
        let outer = btf.struct_named("outer").unwrap();
        let members: Vec<_> = btf.members(&outer).collect();
        assert_eq!(members, vec![("a", 1, 0), ("", 3, 32)]);
        let union = btf.peel(3).unwrap();
        assert_eq!(btf.members(&union).collect::<Vec<_>>(), vec![("b", 1, 0)]);
        let e = btf.types().find(|t| btf.type_name(t) == "e").unwrap();
        assert_eq!(btf.enumerators(&e).collect::<Vec<_>>(), vec![("X", 7)]);
    }

    #[test]
    fn damaged_btf_is_an_error_not_a_panic() {
        let whole = sample();
        for cut in 0..whole.len() {
            let _ = Btf::parse(whole[..cut].to_vec());
        }
        assert!(Btf::parse(vec![0; 40]).is_err());
    }
}
