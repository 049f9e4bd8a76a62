//! The generation worker: one OS thread owns the model and decodes every admitted request
//! together (continuous batching), off the async runtime. Requests wait in a bounded queue;
//! each streams its text back through its own channel, and a request whose channel is closed
//! (the client went away) leaves the batch at the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use kiem_engine::batch::{Batcher, Event};
use kiem_engine::sampling::{Control, FinishReason, GenerateOptions};
use kiem_engine::Gpt;
use kiem_tokenizer::stream::StreamDecoder;
use kiem_tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    /// Stop strings: generation ends before the first one, which is not returned.
    pub stops: Vec<String>,
    /// The served adapter to decode with (none: the bare base).
    pub adapter: Option<usize>,
    pub events: UnboundedSender<JobEvent>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The next piece of generated text (whole characters).
    Text(String),
    Done {
        finish: FinishReason,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Counters the server reports at /health.
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs in the queue.
    pub waiting: AtomicUsize,
    /// Jobs being decoded.
    pub active: AtomicUsize,
    /// The most jobs ever decoded together.
    pub peak_active: AtomicUsize,
    pub completed: AtomicU64,
    /// Jobs dropped because their client went away.
    pub cancelled: AtomicU64,
    /// Why the generation thread died, if it did (a panic): the server reports it and stops.
    pub failure: std::sync::OnceLock<String>,
}

/// The sending end of the queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    sender: SyncSender<Job>,
    pub stats: Arc<Stats>,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: try again later.
    Busy,
    /// The generation thread has stopped.
    Stopped,
}

impl Queue {
    /// Queues a job, or says why it cannot.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        // Counted before sending, so the worker never takes a job it has not seen counted.
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let refused = match self.sender.try_send(job) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(_)) => Refused::Busy,
            Err(TrySendError::Disconnected(_)) => Refused::Stopped,
        };
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        Err(refused)
    }
}

/// Starts the worker thread: at most `max_batch` sequences decode together and `queue` more
/// wait.
pub fn start(gpt: Gpt, tokenizer: Arc<Tokenizer>, max_batch: usize, queue: usize) -> Queue {
    let (sender, receiver) = std::sync::mpsc::sync_channel(queue);
    let stats = Arc::new(Stats::default());
    let worker_stats = stats.clone();
    std::thread::Builder::new()
        .name("kiem-generate".into())
        .spawn(move || {
            // The active jobs live outside the unwinding code: a panic is recorded first, and
            // only then are their channels closed (their clients then see the failure).
            let mut batcher = Batcher::new(&gpt);
            let mut active = HashMap::new();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(
                    &tokenizer,
                    &receiver,
                    max_batch,
                    &worker_stats,
                    &mut batcher,
                    &mut active,
                )
            }));
            if let Err(payload) = result {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                let _ = worker_stats.failure.set(message);
            }
            // Dropping the jobs' senders ends their responses with an error, and dropping the
            // queue's receiver makes every later submit say Stopped.
            drop(active);
            drop(receiver);
        })
        .expect("can start the generation thread");
    Queue { sender, stats }
}

struct Active<'t> {
    events: UnboundedSender<JobEvent>,
    decoder: StreamDecoder<'t>,
    tokens: usize,
    /// The client stopped listening.
    gone: bool,
}

fn run<'t>(
    tokenizer: &'t Tokenizer,
    jobs: &Receiver<Job>,
    max_batch: usize,
    stats: &Stats,
    batcher: &mut Batcher<'_, kiem_engine::kernels::Cpu>,
    active: &mut HashMap<u64, Active<'t>>,
) {
    // Test hook: fail (panic) at this decoding step, to check how the server reports it.
    let fail_at: Option<u64> = std::env::var("KIEM_TEST_WORKER_PANIC_AT_STEP")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut steps = 0u64;
    let mut next_id = 0u64;
    loop {
        // Admit waiting jobs into free slots; sleep on the queue only when idle.
        while batcher.len() < max_batch {
            let job = if batcher.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return, // the server is shutting down
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            stats.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed); // its client left while it waited
                continue;
            }
            let id = next_id;
            next_id += 1;
            match batcher.add_with_adapter(id, job.prompt, job.options, job.adapter) {
                Ok(()) => {
                    active.insert(
                        id,
                        Active {
                            events: job.events,
                            decoder: StreamDecoder::new(tokenizer, &job.stops),
                            tokens: 0,
                            gone: false,
                        },
                    );
                }
                Err(e) => {
                    let _ = job.events.send(JobEvent::Failed(e.to_string()));
                }
            }
        }
        // Free the slots of clients that disconnected.
        active.retain(|&id, a| {
            let open = !a.events.is_closed();
            if !open {
                batcher.cancel(id);
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            open
        });
        stats.active.store(batcher.len(), Ordering::SeqCst);
        stats.peak_active.fetch_max(batcher.len(), Ordering::SeqCst);
        steps += 1;
        if fail_at == Some(steps) {
            panic!("KIEM_TEST_WORKER_PANIC_AT_STEP reached");
        }
        let result = batcher.step(&mut |id, event| {
            let Some(a) = active.get_mut(&id) else {
                return Control::Stop;
            };
            match event {
                Event::Token(token) => {
                    a.tokens += 1;
                    let chunk = a.decoder.push(token);
                    if !chunk.text.is_empty() && a.events.send(JobEvent::Text(chunk.text)).is_err()
                    {
                        a.gone = true;
                        return Control::Stop;
                    }
                    if chunk.stopped {
                        return Control::Stop;
                    }
                }
                Event::Finished(finish) => {
                    let Some(mut a) = active.remove(&id) else {
                        return Control::Continue;
                    };
                    let counter = if a.gone || a.events.is_closed() {
                        &stats.cancelled
                    } else {
                        &stats.completed
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let rest = a.decoder.finish();
                    if !rest.is_empty() {
                        let _ = a.events.send(JobEvent::Text(rest));
                    }
                    let _ = a.events.send(JobEvent::Done {
                        finish,
                        completion_tokens: a.tokens,
                    });
                }
            }
            Control::Continue
        });
        if let Err(e) = result {
            // A failed step leaves the caches unusable: fail every active job.
            for (id, a) in active.drain() {
                batcher.cancel(id);
                let _ = a.events.send(JobEvent::Failed(e.to_string()));
            }
        }
        stats.active.store(batcher.len(), Ordering::SeqCst);
    }
}
