//! What the terminal shows: one short line per drop, summary rows, and the
//! labels the report and its HTML page share.
use crate::contract::{Cause, Drop, DropKind, ListenerView, Verdict};

use super::aggregate::Total;

/// "14:13:20.123" of an RFC 3339 time: what the terminal shows.
pub fn clock(rfc3339: &str) -> &str {
    rfc3339.get(11..23).unwrap_or(rfc3339)
}

/// "14:13:20" of an RFC 3339 time: a whole second.
pub fn clock_second(rfc3339: &str) -> &str {
    rfc3339.get(11..19).unwrap_or(rfc3339)
}

/// "value (source)" of a limit, as the terminal shows it.
pub fn limit_label(limit: &Verdict) -> String {
    let hard = limit.hard.map_or(String::new(), |h| format!(" hard {h}"));
    match limit.value {
        Some(value) => format!("{}={value}{hard} ({})", limit.name.as_str(), limit.source),
        None => format!("{} ({})", limit.name.as_str(), limit.source),
    }
}

/// What a drop was: "/run/app.sock queue 101/100, owner uwsgi[1] uwsgi-master,
/// refused nginx[2] nginx-worker", or "nginx[2] nginx-worker socket() failed".
pub fn what_label(drop: &Drop) -> String {
    match (&drop.listener, drop.kind) {
        (Some(listener), DropKind::EphemeralPorts) => format!(
            "{} connect() to {} failed",
            drop.client.label(),
            listener.label()
        ),
        (Some(listener), _) => format!(
            "{} {}, owner {}, refused {}",
            listener.label(),
            queue_label(listener),
            listener.owner_label(),
            drop.client.label()
        ),
        (None, _) => match drop.client.syscall {
            Some(syscall) => format!("{} {syscall}() failed", drop.client.label()),
            None => format!("{} refused a connection", drop.client.label()),
        },
    }
}

pub fn cause_label(cause: &Cause) -> String {
    format!(
        " [caused by {} at {}: {}[{}] {}hit {}{}; fix that first]",
        cause.kind.as_str(),
        clock(&cause.time),
        cause.comm,
        cause.pid,
        cause.syscall.map_or(String::new(), |s| format!("{s}() ")),
        cause.limit.as_str(),
        cause.value.map_or(String::new(), |v| format!("={v}"))
    )
}

/// "tcp_accept_queue[syn]", "unix_backlog".
pub fn kind_label(drop: &Drop) -> String {
    match drop.stage {
        Some(stage) => format!("{}[{stage}]", drop.kind.as_str()),
        None => drop.kind.as_str().to_string(),
    }
}

/// The column titles above `total_row`s.
pub const TOTALS_HEADER: &str = "   COUNT  KIND                  LISTENER OR PROCESS          OWNER OR CLIENT                LIMIT";

/// One summary row: count, kind, listener (or process), its owner (or the
/// client), the limit with its value and source.
pub fn total_row(total: &Total) -> String {
    let drop = &total.drop;
    format!(
        "{:>8}  {:<21} {:<28} {:<30} {}",
        total.count,
        kind_label(drop),
        drop.subject(),
        drop.owner_or_client(),
        limit_label(&drop.limit)
    )
}

fn queue_label(listener: &ListenerView) -> String {
    let show = |v: Option<u32>| v.map_or("?".to_string(), |v| v.to_string());
    format!("queue {}/{}", show(listener.queue), show(listener.backlog))
}

/// `text` as it may reach a terminal: process names, paths and config
/// values come from other people's processes, so control characters
/// (escape sequences, newlines that would forge a line) are shown as
/// `\x1b`, `\n`, `\r`, `\t` or `\xNN`, never sent raw.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod escape_tests {
    use super::escape;

    #[test]
    fn control_characters_are_shown_never_sent() {
        assert_eq!(escape("nginx"), "nginx");
        assert_eq!(escape("ev\x1b[2Jil\n"), "ev\\x1b[2Jil\\n");
        assert_eq!(escape("a\rb\tc\x07\u{9b}d é"), "a\\rb\\tc\\x07\\x9bd é");
    }
}
