//! Storm control: the first drop of a (kind, listener, limit) is shown at
//! once, the ones after it are counted and shown at most once per interval.
//! Every drop ends up in exactly one emitted count and in the totals.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::contract::{Client, Drop, DropKind, LimitName, Line, Stage, TotalRecord};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    kind: DropKind,
    netns: Option<u32>,
    stage: Option<Stage>,
    listener: String,
    limit: LimitName,
}

impl Key {
    pub fn of(drop: &Drop) -> Self {
        Self {
            kind: drop.kind,
            netns: drop.listener.as_ref().and_then(|l| l.netns),
            stage: drop.stage,
            listener: drop.subject(),
            limit: drop.limit.name,
        }
    }
}

struct Batch {
    latest: Drop,
    pending: u64,
    last_emit: Instant,
    total: u64,
}

/// A per-key total for the summary.
#[derive(Clone, Debug)]
pub struct Total {
    pub drop: Drop,
    pub count: u64,
}

impl From<&Total> for TotalRecord {
    fn from(total: &Total) -> Self {
        let drop = &total.drop;
        Self {
            kind: drop.kind,
            stage: drop.stage,
            listener: drop.listener.clone(),
            client: drop.listener.is_none().then(|| drop.client.clone()),
            limit: drop.limit.clone(),
            count: total.count,
        }
    }
}

/// Summary rows kept apart; more are folded into an OTHERS row per kind.
const MAX_ROWS: usize = 10_000;
const OTHERS: &str = "(more than 10000 others, not told apart)";

pub struct Aggregator {
    interval: Duration,
    batches: HashMap<Key, Batch>,
    /// Keys in order of first appearance, so summaries are stable.
    order: Vec<Key>,
}

impl Aggregator {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            batches: HashMap::new(),
            order: Vec::new(),
        }
    }

    /// Count `count` drops like `drop`; returns a line when one is due now.
    pub fn add(&mut self, drop: Drop, count: u64, now: Instant) -> Option<Line> {
        let mut key = Key::of(&drop);
        let mut drop = drop;
        if self.batches.len() >= MAX_ROWS && !self.batches.contains_key(&key) {
            // Processes choose their names: past MAX_ROWS, new rows are
            // folded into one per kind and limit, counted all the same.
            drop.listener = None;
            drop.client = Client {
                comm: Some(OTHERS.into()),
                ..Client::default()
            };
            key = Key::of(&drop);
        }
        match self.batches.get_mut(&key) {
            None => {
                self.order.push(key.clone());
                self.batches.insert(
                    key,
                    Batch {
                        latest: drop.clone(),
                        pending: 0,
                        last_emit: now,
                        total: count,
                    },
                );
                Some(Line {
                    drop,
                    count,
                    first: true,
                })
            }
            Some(batch) => {
                batch.total = batch.total.saturating_add(count);
                batch.pending = batch.pending.saturating_add(count);
                batch.latest = drop;
                Self::take_if_due(batch, now, self.interval)
            }
        }
    }

    fn take_if_due(batch: &mut Batch, now: Instant, interval: Duration) -> Option<Line> {
        if batch.pending == 0 || now.duration_since(batch.last_emit) < interval {
            return None;
        }
        let line = Line {
            drop: batch.latest.clone(),
            count: batch.pending,
            first: false,
        };
        batch.pending = 0;
        batch.last_emit = now;
        Some(line)
    }

    /// The listeners that had drops so far (not the destinations of
    /// ephemeral_ports drops), as (netns, label).
    pub fn listeners(&self) -> Vec<(Option<u32>, String)> {
        self.order
            .iter()
            .filter_map(|key| {
                let listener = self.batches.get(key)?.latest.refusing_listener()?;
                Some((listener.netns, listener.label()))
            })
            .collect()
    }

    /// Lines whose interval has passed (call on a timer).
    pub fn due(&mut self, now: Instant) -> Vec<Line> {
        let interval = self.interval;
        self.order
            .iter()
            .filter_map(|key| Self::take_if_due(self.batches.get_mut(key)?, now, interval))
            .collect()
    }

    /// Every pending count, whatever the interval (at exit).
    pub fn drain(&mut self) -> Vec<Line> {
        self.order
            .iter()
            .filter_map(|key| {
                let batch = self.batches.get_mut(key)?;
                let last_emit = batch.last_emit;
                Self::take_if_due(batch, last_emit + self.interval, self.interval)
            })
            .collect()
    }

    pub fn totals(&self) -> Vec<Total> {
        self.order
            .iter()
            .filter_map(|key| {
                let batch = self.batches.get(key)?;
                Some(Total {
                    drop: batch.latest.clone(),
                    count: batch.total,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Client, Family, ListenerView, Role, Verdict};
    use std::time::SystemTime;

    fn drop_at(path: &str) -> Drop {
        Drop {
            time: SystemTime::now(),
            kind: DropKind::UnixBacklog,
            stage: None,
            client: Client {
                pid: Some(1),
                comm: Some("nginx".into()),
                role: Some(Role::NginxWorker),
                ..Client::default()
            },
            listener: Some(ListenerView {
                family: Family::Unix,
                path: Some(path.into()),
                addr: None,
                port: None,
                netns: Some(1),
                pid: None,
                comm: None,
                role: None,
                queue: None,
                backlog: Some(100),
            }),
            limit: Verdict {
                name: LimitName::UwsgiListen,
                value: Some(100),
                hard: None,
                source: String::new(),
                fix: String::new(),
            },
            caused_by: None,
        }
    }

    #[test]
    fn rows_past_the_cap_are_folded_and_still_counted() {
        let mut agg = Aggregator::new(Duration::ZERO);
        let now = Instant::now();
        for n in 0..MAX_ROWS + 500 {
            agg.add(drop_at(&format!("/run/{n}.sock")), 2, now);
        }
        // A row kept apart before the cap still grows.
        agg.add(drop_at("/run/0.sock"), 1, now);
        let totals = agg.totals();
        assert_eq!(totals.len(), MAX_ROWS + 1);
        assert_eq!(
            totals.iter().map(|t| t.count).sum::<u64>(),
            2 * (MAX_ROWS as u64 + 500) + 1
        );
        let others = totals.iter().find(|t| t.drop.listener.is_none()).unwrap();
        assert_eq!(others.count, 1000);
        assert!(others.drop.subject().starts_with(OTHERS));
        assert_eq!(totals[0].count, 3);
    }

    #[test]
    fn a_storm_becomes_a_few_lines_whose_counts_add_up() {
        let mut agg = Aggregator::new(Duration::from_millis(250));
        let start = Instant::now();
        let mut printed = 0;
        let mut lines = 0;
        // 10 000 drops over one second, on two listeners.
        for i in 0..10_000u64 {
            let now = start + Duration::from_micros(i * 100);
            let path = if i % 2 == 0 { "/a" } else { "/b" };
            if let Some(line) = agg.add(drop_at(path), 1, now) {
                printed += line.count;
                lines += 1;
            }
            for line in agg.due(now) {
                printed += line.count;
                lines += 1;
            }
        }
        for line in agg.drain() {
            printed += line.count;
            lines += 1;
        }
        assert_eq!(printed, 10_000);
        assert!(
            lines <= 2 * 6,
            "{lines} lines for 1 s of storm on 2 listeners"
        );
        let totals = agg.totals();
        assert_eq!(
            totals.iter().map(|t| t.count).collect::<Vec<_>>(),
            vec![5_000, 5_000]
        );
        assert_eq!(totals[0].drop.subject(), "/a");
    }

    #[test]
    fn batches_from_kernel_counters_count_as_many_drops() {
        let mut agg = Aggregator::new(Duration::from_millis(250));
        let start = Instant::now();
        assert_eq!(agg.add(drop_at("/a"), 500, start).unwrap().count, 500);
        assert!(agg.add(drop_at("/a"), 20, start).is_none());
        assert_eq!(agg.drain()[0].count, 20);
        assert_eq!(agg.totals()[0].count, 520);
    }

    #[test]
    fn a_single_drop_is_shown_at_once_and_not_again() {
        let mut agg = Aggregator::new(Duration::from_millis(250));
        let line = agg.add(drop_at("/a"), 1, Instant::now()).unwrap();
        assert!(line.first);
        assert_eq!(line.count, 1);
        assert!(agg.drain().is_empty());
    }
}
