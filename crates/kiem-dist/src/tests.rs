//! The in-place helpers on ranks simulated by threads (real MPI runs in the `kiem` crate's
//! tests under mpirun).

use std::sync::{Arc, Barrier, Mutex};

use super::*;

/// Ranks as threads: each collective posts its input, waits for all, computes from all.
struct Threads {
    rank: usize,
    size: usize,
    posted: Arc<Mutex<Vec<Vec<f64>>>>,
    barrier: Arc<Barrier>,
}

impl Threads {
    fn exchange(&self, send: Vec<f64>) -> Vec<Vec<f64>> {
        self.posted.lock().unwrap()[self.rank] = send;
        self.barrier.wait();
        let all = self.posted.lock().unwrap().clone();
        self.barrier.wait();
        all
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_f32(&self, send: &[f32], recv: &mut [f32]) {
        let all = self.exchange(send.iter().map(|&x| x as f64).collect());
        for (i, r) in recv.iter_mut().enumerate() {
            *r = all.iter().map(|v| v[i] as f32).sum();
        }
    }
    fn all_reduce_f64(&self, send: &[f64], recv: &mut [f64]) {
        let all = self.exchange(send.to_vec());
        for (i, r) in recv.iter_mut().enumerate() {
            *r = all.iter().map(|v| v[i]).sum();
        }
    }
    fn reduce_scatter_f32(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(send.len(), recv.len() * self.size);
        let all = self.exchange(send.iter().map(|&x| x as f64).collect());
        let base = self.rank * recv.len();
        for (i, r) in recv.iter_mut().enumerate() {
            *r = all.iter().map(|v| v[base + i] as f32).sum();
        }
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(send.len() * self.size, recv.len());
        let all = self.exchange(send.iter().map(|&x| x as f64).collect());
        for (r, v) in all.iter().enumerate() {
            for (i, &x) in v.iter().enumerate() {
                recv[r * send.len() + i] = x as f32;
            }
        }
    }
    fn gather_f32(&self, send: &[f32], recv: &mut [f32]) {
        let all = self.exchange(send.iter().map(|&x| x as f64).collect());
        if self.rank == 0 {
            for (r, v) in all.iter().enumerate() {
                for (i, &x) in v.iter().enumerate() {
                    recv[r * send.len() + i] = x as f32;
                }
            }
        }
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        let all = self.exchange(bytes.iter().map(|&b| b as f64).collect());
        *bytes = all[0].iter().map(|&b| b as u8).collect();
    }
    fn barrier(&self) {
        self.barrier.wait();
    }
    fn abort(&self, code: i32) -> ! {
        panic!("abort {code}")
    }
    fn describe(&self) -> String {
        format!("{} threads", self.size)
    }
}

/// Runs `f` on `size` simulated ranks and returns what each returned.
fn on_ranks<T: Send + 'static>(
    size: usize,
    f: impl Fn(&dyn Collective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let posted = Arc::new(Mutex::new(vec![Vec::new(); size]));
    let barrier = Arc::new(Barrier::new(size));
    let f = Arc::new(f);
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let world = Threads {
                rank,
                size,
                posted: posted.clone(),
                barrier: barrier.clone(),
            };
            let f = f.clone();
            std::thread::spawn(move || f(&world))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank r's values: small integers, so sums are exact in f32.
fn values(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 23) as f32)
        .collect()
}

fn sums(ranks: usize, len: usize) -> Vec<f32> {
    let all: Vec<_> = (0..ranks).map(|r| values(r, len)).collect();
    (0..len).map(|i| all.iter().map(|v| v[i]).sum()).collect()
}

#[test]
fn shards_cover_the_buffer_once() {
    for (len, ranks) in [(10, 3), (9, 3), (2, 4), (0, 2), (BUCKET * 2 + 5, 3)] {
        let s = Shards::new(len, ranks);
        let mut next = 0;
        for r in 0..ranks {
            let range = s.range(r);
            assert_eq!(range.start, next, "{len} over {ranks}");
            assert!(range.len() <= s.per_rank);
            next = range.end;
        }
        assert_eq!(next, len);
    }
}

#[test]
fn all_reduce_in_place_sums_across_buckets() {
    // More than two buckets, so the staging loop runs several times and ends short.
    let len = 2 * BUCKET + 1234;
    let results = on_ranks(3, move |w| {
        let mut data = values(w.rank(), len);
        all_reduce_in_place(w, &mut data, &mut Vec::new());
        data
    });
    let want = sums(3, len);
    for got in results {
        assert!(got == want);
    }
}

#[test]
fn reduce_scatter_then_all_gather_equals_all_reduce() {
    for (len, ranks) in [(BUCKET + 77, 3), (11, 4), (3, 4), (64, 2)] {
        let results = on_ranks(ranks, move |w| {
            let shards = Shards::new(len, w.size());
            let mut data = values(w.rank(), len);
            reduce_scatter_in_place(w, &mut data, shards, &mut Vec::new());
            let mine = data[shards.range(w.rank())].to_vec();
            let mut gathered = Vec::new();
            gather_shards_to_root(w, &mine, shards, |range, values| {
                // Windows arrive bucket by bucket, each rank's in turn.
                gathered.resize(gathered.len().max(range.end), f32::NAN);
                gathered[range].copy_from_slice(values);
                Ok::<(), ()>(())
            })
            .unwrap();
            all_gather_in_place(w, &mut data, shards, &mut Vec::new());
            (mine, data, gathered)
        });
        let want = sums(ranks, len);
        let shards = Shards::new(len, ranks);
        for (rank, (mine, all, gathered)) in results.into_iter().enumerate() {
            assert!(
                mine == want[shards.range(rank)],
                "{len} over {ranks}, rank {rank}"
            );
            assert!(all == want, "{len} over {ranks}, rank {rank}");
            assert!(gathered == if rank == 0 { &want[..] } else { &[] });
        }
    }
}

#[test]
fn one_process_leaves_data_alone() {
    let mut data = values(0, 100);
    let before = data.clone();
    all_reduce_in_place(&Solo, &mut data, &mut Vec::new());
    reduce_scatter_in_place(&Solo, &mut data, Shards::new(100, 1), &mut Vec::new());
    all_gather_in_place(&Solo, &mut data, Shards::new(100, 1), &mut Vec::new());
    assert_eq!(data, before);
    assert_eq!(world().size(), 1);
}
