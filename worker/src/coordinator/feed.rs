//! The batch's results as they reach `LOCKSTEP_RESULTS`, read by an
//! ordered consumer that is opened again, from the last message read, when
//! it goes quiet. A consumer lives on one server: when that server dies or
//! the stream's leader moves, the client notices only after missed
//! heartbeats and backoffs (half a minute and more, measured on a 3-node
//! cluster); a fresh consumer from the last stream sequence costs one
//! request and can neither lose nor repeat a message.
//!
//! `LOCKSTEP_RESULTS` only *sources* the workers' own results streams, and
//! when a worker stream's leader moves the server takes 10-30 s to source
//! from it again. So a quiet feed also reads, directly, the own streams of
//! the workers still owing results (each subject there is its worker's
//! alone, as in the aggregate); the copies that arrive later through the
//! aggregate are the same results, and counted once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

use crate::nats::Nats;
use crate::protocol::{results_filter, worker_results_stream, RESULT_SUBJECT_PREFIX};

/// Quiet for this long, the feed is opened again; each reopening that
/// brings nothing doubles it, up to [`MAX_PATIENCE`].
const PATIENCE: Duration = Duration::from_secs(3);
const MAX_PATIENCE: Duration = Duration::from_secs(24);

pub(super) struct Feed<'a> {
    nats: &'a Nats,
    filter: String,
    messages: consumer::pull::Ordered,
    /// Stream sequence of the last message handed out (0: none yet).
    last_seq: u64,
    heard: Instant,
    patience: Duration,
    batch: String,
    /// Per worker: the sequence in its own results stream of the last
    /// message read there directly.
    direct: HashMap<String, u64>,
}

impl<'a> Feed<'a> {
    /// Every result of `batch`, from the beginning (a restart replays them).
    pub async fn open(nats: &'a Nats, batch: &str) -> Result<Self> {
        let filter = results_filter(batch);
        let messages = ordered(nats, &filter, 0).await?;
        Ok(Self {
            nats,
            filter,
            messages,
            last_seq: 0,
            heard: Instant::now(),
            patience: PATIENCE,
            batch: batch.to_string(),
            direct: HashMap::new(),
        })
    }

    pub async fn next(&mut self) -> Option<Result<jetstream::Message>> {
        let m = self.messages.next().await?;
        Some(match m {
            Ok(m) => {
                if let Ok(info) = m.info() {
                    self.last_seq = info.stream_sequence;
                }
                self.heard = Instant::now();
                self.patience = PATIENCE;
                Ok(m)
            }
            Err(e) => Err(e.into()),
        })
    }

    /// When the feed has been quiet for its patience: opens it again from
    /// the message after the last one read, and reads the own results
    /// streams of `owing` (the workers holding replicas not yet answered)
    /// directly; returns what that found. A failure (no leader yet) keeps
    /// the old feed until the next try.
    pub async fn refresh_if_quiet(
        &mut self,
        owing: impl FnOnce() -> Vec<String>,
    ) -> Vec<jetstream::Message> {
        if self.heard.elapsed() < self.patience {
            return Vec::new();
        }
        self.heard = Instant::now();
        self.patience = (self.patience * 2).min(MAX_PATIENCE);
        let fresh = tokio::time::timeout(
            Duration::from_secs(3),
            ordered(self.nats, &self.filter, self.last_seq + 1),
        )
        .await;
        match fresh {
            Ok(Ok(m)) => {
                tracing::debug!(from = self.last_seq + 1, "results feed opened again");
                self.messages = m;
            }
            Ok(Err(e)) => tracing::debug!("cannot open the results feed again yet: {e:#}"),
            Err(_) => tracing::debug!("cannot open the results feed again yet: no answer"),
        }
        let (nats, batch) = (self.nats, self.batch.as_str());
        let reads = owing().into_iter().map(|w| {
            let from = self.direct.get(&w).map_or(0, |s| s + 1);
            async move {
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    read_own_stream(nats, batch, &w, from),
                )
                .await;
                (w, r)
            }
        });
        let reads: Vec<_> = futures::stream::iter(reads)
            .buffer_unordered(16)
            .collect()
            .await;
        let mut found = Vec::new();
        for (w, r) in reads {
            match r {
                Ok(Ok(messages)) => {
                    for m in messages {
                        if let Ok(info) = m.info() {
                            self.direct.insert(w.clone(), info.stream_sequence);
                        }
                        found.push(m);
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(worker = %w, "cannot read its results directly: {e:#}")
                }
                Err(_) => {
                    tracing::debug!(worker = %w, "cannot read its results directly: no answer")
                }
            }
        }
        if !found.is_empty() {
            tracing::debug!(
                messages = found.len(),
                "results read from the workers' own streams"
            );
        }
        found
    }
}

/// The messages of `batch` in `worker`'s own results stream from stream
/// sequence `from` (0: all), as many as it holds now.
async fn read_own_stream(
    nats: &Nats,
    batch: &str,
    worker: &str,
    from: u64,
) -> Result<Vec<jetstream::Message>> {
    let stream = nats.js.get_stream(worker_results_stream(worker)).await?;
    let deliver_policy = if from == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        }
    };
    let mut c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{RESULT_SUBJECT_PREFIX}.{batch}.{worker}"),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut pending = c.info().await?.num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = c.messages().await?;
    while pending > 0 {
        match messages.next().await {
            Some(Ok(m)) => out.push(m),
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
        pending -= 1;
    }
    Ok(out)
}

/// An ordered consumer of `filter` from stream sequence `from` (0: all).
async fn ordered(nats: &Nats, filter: &str, from: u64) -> Result<consumer::pull::Ordered> {
    let deliver_policy = if from == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        }
    };
    nats.results
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .context("cannot read results")?
        .messages()
        .await
        .context("cannot read results")
}
