//! The eBPF object as built (`$DROPTRACE_EBPF_OBJECT`): what no program
//! may contain.
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

/// bpf-linker exports memset, memcpy and memmove as loops of one byte per
/// round, and LLVM calls them instead of writing inline stores while
/// bpf-linker's --bpf-expand-memcpy-in-order is on (xtask turns it off).
/// One such call zeroed the 108-byte key of every refused connect; eleven
/// were in the program that sees every TCP packet.
#[test]
fn no_program_calls_a_byte_at_a_time_memory_function() {
    let path = std::env::var("DROPTRACE_EBPF_OBJECT")
        .expect("DROPTRACE_EBPF_OBJECT is unset: run the tests through `cargo xtask test`");
    let data = std::fs::read(&path).unwrap_or_else(|err| panic!("cannot read {path}: {err}"));
    let file = object::File::parse(&*data).expect("the eBPF object is not ELF");
    let (mut relocations, mut calls) = (0, Vec::new());
    for section in file.sections() {
        for (_, relocation) in section.relocations() {
            relocations += 1;
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let name = file
                .symbol_by_index(index)
                .and_then(|s| s.name())
                .unwrap_or("");
            if ["memset", "memcpy", "memmove"].contains(&name) {
                calls.push(format!("{} calls {name}", section.name().unwrap_or("?")));
            }
        }
    }
    // The programs' map references are relocations too: they were read.
    assert!(relocations > 100, "only {relocations} relocations read");
    assert!(calls.is_empty(), "{}", calls.join("\n"));
}
