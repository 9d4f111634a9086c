//! `droptrace report FILE...`: captures explained, without root or eBPF.
//!
//! A drop record stands for `count` drops that happened up to its time
//! (after the previous record of the same listener and limit, at most
//! 250 ms earlier in a storm); per-second figures put them in its second.
mod analysis;
pub mod capture;
mod html;

use std::{io::Write, path::Path};

use anyhow::{Context, Result};

use crate::cli::ReportArgs;
pub use analysis::{Analysis, ReportJson};

pub fn run(args: &ReportArgs) -> Result<()> {
    let analysis = Analysis::of(&args.files)?;
    for (file, capture) in args.files.iter().zip(&analysis.captures) {
        if let Some(reason) = &capture.truncated {
            eprintln!(
                "droptrace: warning: {} is truncated ({reason}): droptrace was killed, crashed or ran out of disk; reporting up to its last complete record",
                file.display()
            );
        }
        if capture.unknown_records > 0 {
            eprintln!(
                "droptrace: warning: {}: skipped {} records of types this droptrace does not know",
                file.display(),
                capture.unknown_records
            );
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &analysis.json)?;
        writeln!(out)?;
    } else {
        analysis.write_text(&mut out)?;
    }
    if let Some(html) = &args.html {
        write_html(html, &analysis)?;
        eprintln!("droptrace: wrote {}", html.display());
    }
    Ok(())
}

/// The page goes to a new file only (see `create_new`).
fn write_html(path: &Path, analysis: &Analysis) -> Result<()> {
    let page = html::page(analysis);
    let mut file = crate::sinks::capture::create_new(path)?;
    file.write_all(page.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
