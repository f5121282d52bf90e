use blockflash::mask::{complete_tree_parents, MaskSpec};
use blockflash::{BlockMask, Mask};
use std::time::Instant;
fn t<T>(name: &str, n: usize, mut f: impl FnMut() -> T) {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            std::hint::black_box(f());
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    println!("{name}: {:.2} ms", v[n / 2]);
}
fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    let n = 16384;
    if which == "tree" || which.is_empty() {
        let tree = complete_tree_parents(12, 2).unwrap();
        let spec = MaskSpec::Tree {
            prefix_len: n - tree.len(),
            parents: tree,
        };
        t(
            "tree fast 64",
            if which.is_empty() { 7 } else { 200 },
            || spec.block_mask(64, 64).unwrap(),
        );
    }
    if which == "rand" || which.is_empty() {
        let m = Mask::random(n, n, 0.5, 1).unwrap();
        t("rand new 64", if which.is_empty() { 7 } else { 60 }, || {
            BlockMask::new(&m, 64, 64).unwrap()
        });
        t("memcpy 32MiB", 7, || m.clone());
    }
    if which == "dil" || which.is_empty() {
        let spec = MaskSpec::DilatedWindow {
            seq: n,
            window: 256,
            dilation: 4,
            causal: true,
        };
        t("dil mask", 7, || spec.mask().unwrap());
    }
}
