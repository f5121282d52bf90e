//! Host work spread over the cores with scoped threads: one thread where the work is small or
//! where std has no threads (wasm).

/// Threads for `work` units when spreading pays from `threshold` units on: up to 8, and 1 below
/// the threshold or where the platform reports no parallelism.
pub(crate) fn threads(work: usize, threshold: usize) -> usize {
    if work < threshold {
        return 1;
    }
    // No threads where std has none (wasm): available_parallelism is an error there.
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Runs the jobs, on scoped threads when there is more than one.
pub(crate) fn run_all(jobs: Vec<impl FnOnce() + Send>) {
    if jobs.len() <= 1 {
        jobs.into_iter().for_each(|job| job());
        return;
    }
    std::thread::scope(|s| {
        let mut jobs = jobs.into_iter();
        let mine = jobs.next();
        for job in jobs {
            s.spawn(job);
        }
        if let Some(job) = mine {
            job();
        }
    });
}

/// `f` over `items` in order, spread over every available core (on one thread where there is
/// one, as in the browser): for items that are each heavy work (the f64 reference's rows),
/// where `threads`' cap of 8 for memory-bound passes does not apply.
pub(crate) fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 || items.len() < 2 {
        return items.iter().map(f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("a worker thread panicked"))
            .collect()
    })
}

/// Elements of an element-wise pass below which one thread does it all.
const PARALLEL_ELEMENTS: usize = 1 << 20;

/// Calls `f(start, chunk)` on contiguous chunks of `data` that cover it, `start` being the
/// chunk's first index, spread over threads where `data` is large; chunk lengths are multiples
/// of `unit` but for the last.
pub(crate) fn for_chunks<T: Send>(data: &mut [T], unit: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let n = threads(data.len(), PARALLEL_ELEMENTS);
    let len = data.len().div_ceil(n).next_multiple_of(unit.max(1)).max(1);
    let f = &f;
    run_all(
        data.chunks_mut(len)
            .enumerate()
            .map(|(i, chunk)| move || f(i * len, chunk))
            .collect(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_data_once_at_their_offsets() {
        for n in [0, 1, 7, PARALLEL_ELEMENTS + 3] {
            let mut data = vec![0usize; n];
            for_chunks(&mut data, 2, |start, chunk| {
                assert!(start % 2 == 0 || chunk.is_empty());
                for (i, x) in chunk.iter_mut().enumerate() {
                    *x += start + i + 1;
                }
            });
            assert!(data.iter().enumerate().all(|(i, &x)| x == i + 1), "{n}");
        }
    }
}
