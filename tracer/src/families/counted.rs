//! Drops the kernel counts exactly, per CPU, under a key holding everything
//! their explanation depends on (refused connects, open-file limits, nginx
//! workers out of slots), turned into new drops: what each key gained since
//! the last read, explained by the key's latest sampled record. Counts never
//! depend on the ring buffer: a key whose sample never came is explained
//! from the key alone.
//!
//! A key stops being held once its process has exited and no drop came for
//! RETIRE_AFTER (see [`Counted::retire`]): the kernel's table and ours
//! stay bounded for weeks.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    time::{Duration, Instant},
};

use tracer_common::{ConnectFailure, ConnectKey, FdLimitKey, FdLimitRecord, NoConnectionRecord};

/// A sampled kernel record of counted drops.
pub trait Sample: Copy {
    type Key: Copy + Eq + Hash;
    fn key(&self) -> Self::Key;
    /// The record a count stands for when its sample did not come.
    fn from_key(key: &Self::Key, ktime_ns: u64, comm: [u8; 16]) -> Self;
    fn pid(key: &Self::Key) -> u32;
    fn at(self, ktime_ns: u64) -> Self;
}

impl Sample for ConnectFailure {
    type Key = ConnectKey;
    fn key(&self) -> ConnectKey {
        ConnectFailure::key(self)
    }
    fn from_key(key: &ConnectKey, ktime_ns: u64, comm: [u8; 16]) -> Self {
        ConnectFailure::new(key, key.pid, ktime_ns, comm)
    }
    fn pid(key: &ConnectKey) -> u32 {
        key.pid
    }
    fn at(self, ktime_ns: u64) -> Self {
        Self { ktime_ns, ..self }
    }
}

impl Sample for FdLimitRecord {
    type Key = FdLimitKey;
    fn key(&self) -> FdLimitKey {
        FdLimitRecord::key(self)
    }
    fn from_key(key: &FdLimitKey, ktime_ns: u64, comm: [u8; 16]) -> Self {
        FdLimitRecord::new(key, key.pid, ktime_ns, comm)
    }
    fn pid(key: &FdLimitKey) -> u32 {
        key.pid
    }
    fn at(self, ktime_ns: u64) -> Self {
        Self { ktime_ns, ..self }
    }
}

impl Sample for NoConnectionRecord {
    type Key = u32;
    fn key(&self) -> u32 {
        self.pid
    }
    fn from_key(pid: &u32, ktime_ns: u64, comm: [u8; 16]) -> Self {
        NoConnectionRecord::new(*pid, *pid, ktime_ns, comm)
    }
    fn pid(pid: &u32) -> u32 {
        *pid
    }
    fn at(self, ktime_ns: u64) -> Self {
        Self { ktime_ns, ..self }
    }
}

/// A key is retired this long after its last drop (once its process is
/// gone).
pub const RETIRE_AFTER: Duration = Duration::from_secs(60);

/// What was shown of a counted key, and when it last grew (the TCP family
/// keeps its keys the same way).
pub struct Shown {
    pub total: u64,
    grew: Instant,
}

impl Shown {
    /// `total` shown now.
    pub fn now(total: u64) -> Self {
        Self {
            total,
            grew: Instant::now(),
        }
    }

    /// No drop came for `after`.
    pub fn idle_for(&self, after: Duration) -> bool {
        self.grew.elapsed() >= after
    }
}

/// One counted family's keys: totals already shown, and latest samples.
pub struct Counted<R: Sample> {
    shown: HashMap<R::Key, Shown>,
    /// The latest sample of each key, and whether it is newer than the
    /// last drops shown for the key (then its time is theirs).
    samples: HashMap<R::Key, (R, bool)>,
    /// Keys with new drops and no sample yet, given one more read for it.
    waiting: HashSet<R::Key>,
}

impl<R: Sample> Default for Counted<R> {
    fn default() -> Self {
        Self {
            shown: HashMap::new(),
            samples: HashMap::new(),
            waiting: HashSet::new(),
        }
    }
}

/// New drops of a key: the record that explains them and how many.
pub struct Batch<R> {
    pub record: R,
    pub count: u64,
}

impl<R: Sample> Counted<R> {
    pub fn sample(&mut self, record: R) {
        self.samples.insert(record.key(), (record, true));
    }

    /// The new drops in `totals` (per-key sums over CPUs). A key whose
    /// sample has not come yet waits one read for it (the kernel counts
    /// before it sends), unless `last`. `now_ns`: kernel time now;
    /// `comm`: a process name, for keys without a sample.
    pub fn poll(
        &mut self,
        totals: Vec<(R::Key, u64)>,
        last: bool,
        now_ns: u64,
        mut comm: impl FnMut(u32) -> [u8; 16],
    ) -> Vec<Batch<R>> {
        let mut batches = Vec::new();
        for (key, total) in totals {
            let shown = self.shown.get(&key).map_or(0, |s| s.total);
            if total <= shown {
                continue;
            }
            let record = match self.samples.get_mut(&key) {
                Some((record, fresh)) => {
                    let record = if *fresh { *record } else { record.at(now_ns) };
                    *fresh = false;
                    record
                }
                None if !last && self.waiting.insert(key) => continue,
                None => R::from_key(&key, now_ns, comm(R::pid(&key))),
            };
            self.waiting.remove(&key);
            self.shown.insert(key, Shown::now(total));
            batches.push(Batch {
                record,
                count: total - shown,
            });
        }
        batches
    }

    /// Keys whose drops were all shown, whose process is `gone`, and that
    /// did not grow for `after`: forgotten here, to be deleted from the
    /// kernel's table by the caller. A process that has exited makes no
    /// more drops under its key, so deleting the key loses none; if the pid
    /// comes back, its key starts again from zero.
    pub fn retire(&mut self, after: Duration, mut gone: impl FnMut(u32) -> bool) -> Vec<R::Key> {
        let retired: Vec<R::Key> = self
            .shown
            .iter()
            .filter(|(key, shown)| {
                shown.idle_for(after) && !self.waiting.contains(key) && gone(R::pid(key))
            })
            .map(|(key, _)| *key)
            .collect();
        for key in &retired {
            self.shown.remove(key);
            self.samples.remove(key);
        }
        crate::host::shrink(&mut self.shown);
        crate::host::shrink(&mut self.samples);
        retired
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shown.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32, ktime_ns: u64) -> NoConnectionRecord {
        NoConnectionRecord::new(pid, pid + 1, ktime_ns, *b"nginx\0\0\0\0\0\0\0\0\0\0\0")
    }

    #[test]
    fn a_key_is_retired_once_idle_and_its_process_gone_and_counts_again_from_zero() {
        let mut counted = Counted::<NoConnectionRecord>::default();
        counted.sample(sample(7, 100));
        counted.sample(sample(8, 100));
        let batches = counted.poll(vec![(7, 5), (8, 3)], false, 500, |_| [0; 16]);
        assert_eq!(batches.len(), 2);
        // Not idle long enough, or the process still runs: kept.
        assert!(counted.retire(Duration::from_secs(60), |_| true).is_empty());
        assert!(counted.retire(Duration::ZERO, |_| false).is_empty());
        assert_eq!(counted.retire(Duration::ZERO, |pid| pid == 7), vec![7]);
        assert_eq!(counted.len(), 1);
        // The kernel deleted key 7: a new process with that pid counts
        // from zero, and every one of its drops is shown.
        let batches = counted.poll(vec![(7, 2), (8, 3)], true, 600, |_| [0; 16]);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].count, 2);
    }

    #[test]
    fn each_read_yields_what_the_counts_gained_with_the_latest_sample() {
        let mut counted = Counted::<NoConnectionRecord>::default();
        counted.sample(sample(7, 100));
        let batches = counted.poll(vec![(7, 1000)], false, 500, |_| [0; 16]);
        assert_eq!(batches.len(), 1);
        assert_eq!((batches[0].count, batches[0].record.ktime_ns), (1000, 100));
        assert_eq!(batches[0].record.tid, 8, "the sample's thread");
        // No new drops: nothing. New drops, stale sample: stamped now.
        assert!(counted
            .poll(vec![(7, 1000)], false, 600, |_| [0; 16])
            .is_empty());
        let batches = counted.poll(vec![(7, 1003)], false, 700, |_| [0; 16]);
        assert_eq!((batches[0].count, batches[0].record.ktime_ns), (3, 700));
        assert_eq!(batches[0].record.tid, 8);
    }

    #[test]
    fn a_key_without_a_sample_waits_one_read_then_counts_from_the_key() {
        let mut counted = Counted::<NoConnectionRecord>::default();
        assert!(counted
            .poll(vec![(9, 5)], false, 10, |_| [0; 16])
            .is_empty());
        let batches = counted.poll(vec![(9, 6)], false, 20, |pid| {
            assert_eq!(pid, 9);
            *b"worker\0\0\0\0\0\0\0\0\0\0"
        });
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].count, 6);
        assert_eq!((batches[0].record.pid, batches[0].record.tid), (9, 9));
        assert_eq!(batches[0].record.ktime_ns, 20);
        assert_eq!(&batches[0].record.comm[..6], b"worker");
    }

    #[test]
    fn the_last_read_counts_every_key_at_once() {
        let mut counted = Counted::<NoConnectionRecord>::default();
        let batches = counted.poll(vec![(9, 5), (10, 1)], true, 10, |_| [0; 16]);
        assert_eq!(batches.iter().map(|b| b.count).sum::<u64>(), 6);
    }
}
