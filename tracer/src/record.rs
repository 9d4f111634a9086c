//! What `droptrace record` adds to the live loop: once a second, the
//! kernel's listen-queue counters and the watched listeners' queues (only
//! what changed, so an idle day costs nothing), and the --max-size stop.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;

use crate::{
    contract::{
        CountersRecord, ListenCounters, NetnsCounters, QueueSample, QueuesRecord, Record, Snapshot,
    },
    host::{
        snapshot::listener_table,
        sock_diag::{self, NetnsView},
    },
    sinks::{capture::CaptureWriter, write_record},
};

const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Namespaces are looked for again at most this often.
const NAMESPACE_RESCAN: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recording {
    Going,
    /// --max-size reached: stop and write the summary.
    Full,
}

/// A listener by (netns, label): what stays the same across a restart of
/// its owner.
type ListenerKey = (Option<u32>, String);

pub struct Recorder {
    max_size: Option<u64>,
    /// The namespaces whose counters are recorded, and their views.
    namespaces: HashSet<u32>,
    views: HashMap<u32, NetnsView>,
    namespaces_looked_for: Option<Instant>,
    watched: HashSet<ListenerKey>,
    last_counters: HashMap<u32, ListenCounters>,
    last_queues: HashMap<ListenerKey, (u32, u32)>,
    last_sample: Option<Instant>,
}

impl Recorder {
    /// Watch the namespaces and listeners of the header's snapshot,
    /// through the views it opened.
    pub fn new(snapshot: &Snapshot, views: HashMap<u32, NetnsView>, max_size: Option<u64>) -> Self {
        Self {
            max_size,
            namespaces: snapshot.namespaces.iter().map(|n| n.netns).collect(),
            views,
            namespaces_looked_for: Some(Instant::now()),
            watched: snapshot
                .listeners
                .iter()
                .map(|l| (l.netns, l.label()))
                .collect(),
            last_counters: HashMap::new(),
            last_queues: HashMap::new(),
            last_sample: None,
        }
    }

    /// Called on the live loop's tick: samples once a second, then says
    /// whether the capture is full.
    pub fn tick(
        &mut self,
        out: &mut CaptureWriter,
        drop_listeners: Vec<ListenerKey>,
    ) -> Result<Recording> {
        if self
            .last_sample
            .is_none_or(|at| at.elapsed() >= SAMPLE_INTERVAL)
        {
            self.sample(out, drop_listeners)?;
            out.sync()?;
        }
        match self.max_size {
            Some(max) if out.size() >= max => {
                tracing::warn!(
                    "the capture reached --max-size ({} bytes): stopping and writing its summary",
                    out.size()
                );
                Ok(Recording::Full)
            }
            _ => Ok(Recording::Going),
        }
    }

    /// Write the counters and queues that changed since the last sample.
    pub fn sample(
        &mut self,
        out: &mut CaptureWriter,
        drop_listeners: Vec<ListenerKey>,
    ) -> Result<()> {
        self.last_sample = Some(Instant::now());
        for (netns, label) in drop_listeners {
            self.namespaces.extend(netns);
            self.watched.insert((netns, label));
        }
        self.open_views();
        let time = SystemTime::now();

        let mut counters = Vec::new();
        for (&netns, view) in &self.views {
            let Some(now) = view.counters() else { continue };
            if self.last_counters.insert(netns, now) != Some(now) {
                counters.push(NetnsCounters {
                    netns,
                    counters: now,
                });
            }
        }
        if !counters.is_empty() {
            counters.sort_by_key(|c| c.netns);
            let record = CountersRecord {
                time,
                namespaces: counters,
            };
            write_record(out, &Record::Counters(record))?;
        }

        let mut listeners = Vec::new();
        for (&netns, view) in &self.views {
            for (_, listener) in listener_table(netns, view) {
                let key = (listener.netns, listener.label());
                if !self.watched.contains(&key) {
                    continue;
                }
                let (queue, backlog) = (listener.queue.unwrap_or(0), listener.backlog.unwrap_or(0));
                if self.last_queues.insert(key.clone(), (queue, backlog)) != Some((queue, backlog))
                {
                    listeners.push(QueueSample {
                        listener: key.1,
                        netns: key.0,
                        queue,
                        backlog,
                    });
                }
            }
        }
        if !listeners.is_empty() {
            listeners.sort_by(|a, b| (a.netns, &a.listener).cmp(&(b.netns, &b.listener)));
            write_record(out, &Record::Queues(QueuesRecord { time, listeners }))?;
        }
        Ok(())
    }

    /// A view for each recorded namespace, every NAMESPACE_RESCAN: the
    /// ones that went away are dropped (a view would keep them alive).
    fn open_views(&mut self) {
        if self
            .namespaces_looked_for
            .is_some_and(|at| at.elapsed() < NAMESPACE_RESCAN)
        {
            return;
        }
        self.namespaces_looked_for = Some(Instant::now());
        let live = sock_diag::namespaces();
        self.views
            .retain(|inode, _| live.iter().any(|n| n.inode == *inode));
        for netns in live {
            if self.namespaces.contains(&netns.inode) && !self.views.contains_key(&netns.inode) {
                match NetnsView::open(&netns) {
                    Ok(view) => {
                        self.views.insert(netns.inode, view);
                    }
                    Err(err) => tracing::warn!("netns {}: {err:#}", netns.inode),
                }
            }
        }
    }
}
