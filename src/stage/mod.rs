//! The dedup loop that every front-end runs: `seen filter` over lines,
//! `seen kafka` over topics.
//!
//! ```text
//! per batch:  read ─► id ─► decide (in memory) ─► emit new items
//!             then:   flush the sink ─► commit marks (durable per the engine) ─► ack the source
//! ```
//!
//! The order is the guarantee. A mark is logged only after its item has
//! been emitted *and flushed*, so a crash can repeat the items of the batch
//! in flight but never marks an item that was not delivered. The source is
//! acknowledged (an offset committed) only once the marks are durable, so a
//! restart re-reads at most what the marks already cover, plus that batch.

pub mod id;
mod lines;

use std::borrow::Cow;

pub use id::{IdSpec, InvalidId, Tombstones};
pub use lines::{LineSink, LineSource};

use crate::{Deferred, Engine, Error};

/// A boxed error from a source or sink.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a [`Source`] has for the loop.
#[derive(Debug)]
pub enum Next<'a, T: ?Sized> {
    /// An item, borrowed until the next call.
    Item(&'a T),
    /// Nothing available without waiting: the loop closes the batch
    /// (flush, commit, ack) before asking again with `may_block`.
    Idle,
    /// The input is over.
    End,
}

/// An item with an id to read.
pub trait Event {
    /// The id of this item per `spec`.
    fn id_of(&self, spec: &IdSpec) -> Result<Cow<'_, [u8]>, InvalidId>;
}

/// A line (or any byte payload): the whole payload per [`IdSpec`].
impl Event for [u8] {
    fn id_of(&self, spec: &IdSpec) -> Result<Cow<'_, [u8]>, InvalidId> {
        spec.id_of(lines::strip_line_ending(self), None)
    }
}

/// Where items come from.
pub trait Source {
    /// One event (a line, a Kafka message).
    type Item: Event + ?Sized;
    /// The next item. With `may_block == false` the source should answer
    /// [`Next::Idle`] rather than wait for input, so a slow stream does
    /// not hold decided items back.
    fn next(&mut self, may_block: bool) -> Result<Next<'_, Self::Item>, BoxError>;
    /// Every item returned so far is decided, emitted, flushed and its
    /// mark is durable (per the engine's durability): commit offsets.
    fn ack(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Where new items go.
pub trait Sink<T: ?Sized> {
    /// Send `item` on (buffered is fine: [`Sink::flush`] follows before
    /// any mark is logged). `id` is its id, if it has one (a passed-through
    /// invalid item has none).
    fn emit(&mut self, item: &T, id: Option<&[u8]>) -> Result<(), BoxError>;
    /// Make every emitted item delivered (written, acknowledged).
    fn flush(&mut self) -> Result<(), BoxError>;
    /// Send an invalid item to a dead-letter destination, with the reason.
    fn dead_letter(&mut self, item: &T, why: &InvalidId) -> Result<(), BoxError> {
        let _ = item;
        Err(format!("no dead-letter destination for an invalid item ({why})").into())
    }
    /// Told about each invalid item before the policy acts (`seq` counts
    /// items from 1): report it, count it.
    fn invalid(&mut self, seq: u64, why: &InvalidId, action: OnInvalid) {
        let _ = (seq, why, action);
    }
}

/// What to do with an item whose id cannot be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnInvalid {
    /// Drop it (counted).
    #[default]
    Skip,
    /// Emit it as if new, without a mark (counted).
    Pass,
    /// Hand it to [`Sink::dead_letter`] (counted).
    DeadLetter,
    /// Stop with [`StageError::Invalid`], after delivering and marking the
    /// items before it.
    Fail,
}

impl std::str::FromStr for OnInvalid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "skip" => Ok(OnInvalid::Skip),
            "pass" => Ok(OnInvalid::Pass),
            "dead-letter" => Ok(OnInvalid::DeadLetter),
            "fail" => Ok(OnInvalid::Fail),
            other => Err(format!(
                "{other:?}: expected skip, pass, dead-letter or fail"
            )),
        }
    }
}

/// Settings of the loop.
#[derive(Clone, Debug)]
pub struct StageOptions {
    /// Id extraction.
    pub id: IdSpec,
    /// Items decided per batch (one flush and one commit per batch).
    pub batch: usize,
    /// The invalid-input policy.
    pub on_invalid: OnInvalid,
}

impl Default for StageOptions {
    fn default() -> Self {
        StageOptions {
            id: IdSpec::Whole,
            batch: 1024,
            on_invalid: OnInvalid::Skip,
        }
    }
}

/// Counts of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Items read.
    pub read: u64,
    /// Items new, emitted and marked.
    pub new: u64,
    /// Items dropped as duplicates.
    pub duplicate: u64,
    /// Items without a usable id (whatever the policy did with them).
    pub invalid: u64,
    /// Batches committed.
    pub batches: u64,
}

/// Why the loop stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// An invalid item under [`OnInvalid::Fail`] (`seq` counts from 1).
    #[error("item {seq}: {why}")]
    Invalid {
        /// Its position in the input.
        seq: u64,
        /// Why it has no id.
        why: InvalidId,
    },
    /// Reading or acknowledging the source failed.
    #[error("source: {0}")]
    Source(BoxError),
    /// Emitting, flushing or dead-lettering failed.
    #[error("sink: {0}")]
    Sink(BoxError),
    /// The engine refused (memory ceiling, a poisoned log, …).
    #[error(transparent)]
    Engine(#[from] Error),
}

/// Run the loop until the source ends or something fails; `summary` is
/// kept up to date either way. Allocates nothing per item beyond what id
/// extraction needs (JSON ids parse the payload).
pub fn run<S, K>(
    engine: &Engine,
    source: &mut S,
    sink: &mut K,
    options: &StageOptions,
    summary: &mut Summary,
) -> Result<(), StageError>
where
    S: Source,
    K: Sink<S::Item>,
{
    let batch = options.batch.max(1);
    let mut marks = Vec::with_capacity(batch);
    loop {
        marks.clear();
        let mut decided = 0;
        let mut end = false;
        while decided < batch {
            let item = match source.next(decided == 0).map_err(StageError::Source)? {
                Next::Item(item) => item,
                Next::Idle => break,
                Next::End => {
                    end = true;
                    break;
                }
            };
            decided += 1;
            summary.read += 1;
            let decision = item.id_of(&options.id).and_then(|id| {
                match engine.check_and_insert_deferred(&id) {
                    Ok(d) => Ok(Ok((d, id))),
                    Err(e @ (Error::EmptyId | Error::IdTooLong { .. })) => {
                        Err(InvalidId::Refused(e.to_string()))
                    }
                    // Not the item's fault (memory ceiling, storage): stop.
                    Err(e) => Ok(Err(e)),
                }
            });
            match decision {
                Ok(Ok((Deferred::New(mark), id))) => {
                    marks.push(mark);
                    if let Err(e) = sink.emit(item, Some(&id)) {
                        return Err(abandon(engine, &marks, StageError::Sink(e)));
                    }
                    summary.new += 1;
                }
                Ok(Ok((Deferred::Duplicate, _))) => summary.duplicate += 1,
                Ok(Err(e)) => {
                    // Keep the promise for what was already emitted.
                    finish_batch(engine, source, sink, &marks, summary)?;
                    return Err(e.into());
                }
                Err(why) => {
                    summary.invalid += 1;
                    sink.invalid(summary.read, &why, options.on_invalid);
                    let sent = match options.on_invalid {
                        OnInvalid::Skip | OnInvalid::Fail => Ok(()),
                        OnInvalid::Pass => sink.emit(item, None),
                        OnInvalid::DeadLetter => sink.dead_letter(item, &why),
                    };
                    if let Err(e) = sent {
                        return Err(abandon(engine, &marks, StageError::Sink(e)));
                    }
                    match options.on_invalid {
                        OnInvalid::Skip | OnInvalid::Pass | OnInvalid::DeadLetter => {}
                        OnInvalid::Fail => {
                            finish_batch(engine, source, sink, &marks, summary)?;
                            return Err(StageError::Invalid {
                                seq: summary.read,
                                why,
                            });
                        }
                    }
                }
            }
        }
        if decided > 0 {
            finish_batch(engine, source, sink, &marks, summary)?;
        }
        if end {
            return Ok(());
        }
    }
}

/// The batch's items may not have been delivered: take its marks back out
/// of memory (they were never logged), so the ids are new again to a
/// caller that retries with the same engine.
fn abandon(engine: &Engine, marks: &[crate::PendingMark], e: StageError) -> StageError {
    for &m in marks {
        engine.release(m);
    }
    e
}

/// Flush, then commit the marks, then acknowledge: in that order.
fn finish_batch<S: Source, K: Sink<S::Item>>(
    engine: &Engine,
    source: &mut S,
    sink: &mut K,
    marks: &[crate::PendingMark],
    summary: &mut Summary,
) -> Result<(), StageError> {
    if let Err(e) = sink.flush() {
        return Err(abandon(engine, marks, StageError::Sink(e)));
    }
    engine.commit(marks)?;
    source.ack().map_err(StageError::Source)?;
    summary.batches += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the order of sink and source calls.
    #[derive(Default)]
    struct Script {
        items: Vec<Vec<u8>>,
        at: usize,
        log: Vec<String>,
    }

    impl Source for Script {
        type Item = [u8];
        fn next(&mut self, _: bool) -> Result<Next<'_, [u8]>, BoxError> {
            self.at += 1;
            Ok(match self.items.get(self.at - 1) {
                Some(i) => Next::Item(i),
                None => Next::End,
            })
        }
        fn ack(&mut self) -> Result<(), BoxError> {
            self.log.push("ack".into());
            Ok(())
        }
    }

    #[derive(Default)]
    struct Out(Vec<String>);

    impl Sink<[u8]> for Out {
        fn emit(&mut self, item: &[u8], _: Option<&[u8]>) -> Result<(), BoxError> {
            self.0.push(String::from_utf8_lossy(item).into_owned());
            Ok(())
        }
        fn flush(&mut self) -> Result<(), BoxError> {
            self.0.push("flush".into());
            Ok(())
        }
    }

    #[test]
    fn batches_emit_flush_then_ack_and_drop_duplicates() {
        let engine = Engine::builder().build().unwrap();
        let mut src = Script {
            items: ["a", "b", "a", "c", ""]
                .map(|s| s.as_bytes().to_vec())
                .to_vec(),
            ..Default::default()
        };
        let mut out = Out::default();
        let mut summary = Summary::default();
        let opts = StageOptions {
            batch: 2,
            ..Default::default()
        };
        run(&engine, &mut src, &mut out, &opts, &mut summary).unwrap();
        assert_eq!(out.0, ["a", "b", "flush", "c", "flush", "flush"]);
        assert_eq!(src.log, ["ack", "ack", "ack"]);
        assert_eq!(
            (
                summary.read,
                summary.new,
                summary.duplicate,
                summary.invalid
            ),
            (5, 3, 1, 1)
        );
    }

    #[test]
    fn fail_policy_delivers_what_came_before() {
        let engine = Engine::builder().build().unwrap();
        let mut src = Script {
            items: ["x", "", "y"].map(|s| s.as_bytes().to_vec()).to_vec(),
            ..Default::default()
        };
        let mut out = Out::default();
        let mut summary = Summary::default();
        let opts = StageOptions {
            on_invalid: OnInvalid::Fail,
            ..Default::default()
        };
        let err = run(&engine, &mut src, &mut out, &opts, &mut summary).unwrap_err();
        assert!(matches!(err, StageError::Invalid { seq: 2, .. }), "{err}");
        assert_eq!(out.0, ["x", "flush"]);
        assert_eq!(src.log, ["ack"]);
        // Dead-lettering without a destination is an error, not a drop.
        let mut src = Script {
            items: vec![vec![]],
            ..Default::default()
        };
        let opts = StageOptions {
            on_invalid: OnInvalid::DeadLetter,
            ..Default::default()
        };
        assert!(matches!(
            run(&engine, &mut src, &mut out, &opts, &mut summary),
            Err(StageError::Sink(_))
        ));
    }

    /// Emits fine, then fails to deliver.
    struct Undeliverable;

    impl Sink<[u8]> for Undeliverable {
        fn emit(&mut self, _: &[u8], _: Option<&[u8]>) -> Result<(), BoxError> {
            Ok(())
        }
        fn flush(&mut self) -> Result<(), BoxError> {
            Err("brokers gone".into())
        }
    }

    #[test]
    fn a_batch_that_was_not_delivered_leaves_its_ids_new() {
        let engine = Engine::builder().build().unwrap();
        let items = ["a", "b"].map(|s| s.as_bytes().to_vec()).to_vec();
        let mut src = Script {
            items: items.clone(),
            ..Default::default()
        };
        let err = run(
            &engine,
            &mut src,
            &mut Undeliverable,
            &StageOptions::default(),
            &mut Summary::default(),
        )
        .unwrap_err();
        assert!(matches!(err, StageError::Sink(_)), "{err}");
        assert!(src.log.is_empty(), "nothing acknowledged");
        // A retry with the same engine delivers them: they are not
        // remembered as seen.
        assert!(!engine.contains("a").unwrap() && !engine.contains("b").unwrap());
        let mut src = Script {
            items,
            ..Default::default()
        };
        let mut out = Out::default();
        let mut summary = Summary::default();
        run(
            &engine,
            &mut src,
            &mut out,
            &StageOptions::default(),
            &mut summary,
        )
        .unwrap();
        assert_eq!(summary.new, 2);
    }
}
