//! The record contract: every record droptrace writes, in `--json` output
//! and in captures, and reads back in `report`. One `#[serde(tag = "type")]`
//! enum, [`Record`], names them all; kinds, limits, stages and syscalls are
//! enums. Nothing here reads the machine or the kernel.

/// Names that are part of the JSON contract, printed as they serialize.
macro_rules! contract_names {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
            schemars::JsonSchema,
        )]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)*
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

mod drop;
mod limit;
mod records;
mod snapshot;

pub use drop::*;
pub use limit::*;
pub use records::*;
pub use snapshot::*;
