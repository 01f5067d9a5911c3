//! # fedhubert-kernels
//!
//! CPU kernels for the HuBERT conv front-end on plain `f32` slices: 1-D convolution (no padding,
//! no dilation, one group) forward, input gradient and weight gradient, as im2col over the
//! `gemm` crate's packed micro-kernels (AVX-512 when the CPU has it), parallel over (batch, time
//! tile) tasks on the current rayon pool.
//!
//! Layouts are torch's: `x [B, C_in, T]`, `weight [C_out, C_in, K]`, `y [B, C_out, T_out]`
//! with `T_out = (T - K) / stride + 1`, all contiguous row-major.
//!
//! Why tiles over time rather than one GEMM per utterance: the front-end's first layers are
//! long (thousands of frames) while the batch is small (4 utterances on 2 to 16 cores), so
//! batch-only parallelism leaves cores idle, and an im2col tile of a few hundred frames stays in
//! L2 while the GEMM streams over it.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

pub mod act;
pub mod norm;

/// Shape of one conv1d call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv1dShape {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub t_in: usize,
}

/// Rejected shapes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("conv1d: {0}")]
    Shape(String),
}

impl Conv1dShape {
    /// Output length `(T - K) / stride + 1`.
    pub fn t_out(&self) -> usize {
        (self.t_in - self.kernel) / self.stride + 1
    }

    /// Rows of the im2col matrix (`C_in * K`).
    pub fn depth(&self) -> usize {
        self.c_in * self.kernel
    }

    /// Check sizes; `T >= K`, stride and kernel >= 1.
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.kernel == 0 || self.stride == 0 || self.c_in == 0 || self.c_out == 0 {
            return Err(KernelError::Shape(format!("zero size in {self:?}")));
        }
        if self.t_in < self.kernel {
            return Err(KernelError::Shape(format!(
                "input length {} is shorter than the kernel {}",
                self.t_in, self.kernel
            )));
        }
        Ok(())
    }

    /// Multiply-adds of the forward pass times 2 (each backward pass costs the same).
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.c_out * self.depth() * self.t_out()) as f64
    }

    fn check(&self, x: usize, w: usize, y: usize) {
        self.validate().expect("valid conv1d shape");
        assert_eq!(x, self.batch * self.c_in * self.t_in, "x size");
        assert_eq!(w, self.c_out * self.depth(), "weight size");
        assert_eq!(y, self.batch * self.c_out * self.t_out(), "y size");
    }

    /// (batch, t0, t1) tasks of `len` frames (at least `kernel`, so that only neighbouring
    /// tiles of the input gradient overlap, see `backward_input`). The tiling does not depend on
    /// the thread count, so results are the same bits on any number of threads (bit-exact
    /// training resume relies on that).
    fn tiles(&self, len: usize) -> Vec<(usize, usize, usize)> {
        let t_out = self.t_out();
        let len = len.max(self.kernel).min(t_out);
        let mut out = Vec::new();
        for b in 0..self.batch {
            let mut t0 = 0;
            while t0 < t_out {
                let t1 = (t0 + len).min(t_out);
                out.push((b, t0, t1));
                t0 = t1;
            }
        }
        out
    }
}

/// Raw pointer that may cross threads: tasks write disjoint (or phase-separated) regions.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method call makes closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `col [C_in*K, t1-t0]` (row `ci*K + k`, column `t - t0`) = `x_b[ci, t*stride + k]`.
fn im2col(xb: &[f32], s: &Conv1dShape, t0: usize, t1: usize, col: &mut [f32]) {
    let n = t1 - t0;
    let (k, st) = (s.kernel, s.stride);
    for ci in 0..s.c_in {
        let row = &xb[ci * s.t_in..(ci + 1) * s.t_in];
        for kk in 0..k {
            let dst = &mut col[(ci * k + kk) * n..(ci * k + kk + 1) * n];
            let base = t0 * st + kk;
            // Exactly n chunks of `st`, so no bounds checks in the loop; the constant strides
            // of the front-end get their own (vectorised) copies.
            let src = &row[base..base + (n - 1) * st + 1];
            match st {
                1 => dst.copy_from_slice(src),
                2 => gather(dst, src, 2),
                5 => gather(dst, src, 5),
                _ => gather(dst, src, st),
            }
        }
    }
}

#[inline(always)]
fn gather(dst: &mut [f32], src: &[f32], st: usize) {
    for (d, c) in dst.iter_mut().zip(src.chunks(st)) {
        *d = c[0];
    }
}

/// `x_b[ci, t*stride + k] += col[ci*K + k, t - t0]` (the adjoint of [`im2col`]).
///
/// # Safety
/// `xb` points at `C_in * T` floats that no other thread touches in the written range.
unsafe fn col2im_add(col: &[f32], s: &Conv1dShape, t0: usize, t1: usize, xb: *mut f32) {
    let n = t1 - t0;
    let (k, st) = (s.kernel, s.stride);
    for ci in 0..s.c_in {
        let row = unsafe { xb.add(ci * s.t_in) };
        for kk in 0..k {
            let src = &col[(ci * k + kk) * n..(ci * k + kk + 1) * n];
            let base = t0 * st + kk;
            for (j, &v) in src.iter().enumerate() {
                unsafe { *row.add(base + j * st) += v };
            }
        }
    }
}

/// Forward: `y = conv1d(x, weight)` (no bias), overwriting `y`.
pub fn forward(x: &[f32], w: &[f32], s: &Conv1dShape, y: &mut [f32]) {
    s.check(x.len(), w.len(), y.len());
    let (t_out, depth) = (s.t_out(), s.depth());
    let y_ptr = SendPtr(y.as_mut_ptr());
    s.tiles(512)
        .into_par_iter()
        .for_each_init(Vec::new, |col, (b, t0, t1)| {
            let n = t1 - t0;
            col.resize(depth * n, 0.0);
            let xb = &x[b * s.c_in * s.t_in..(b + 1) * s.c_in * s.t_in];
            im2col(xb, s, t0, t1, col);
            // SAFETY: tile (b, t0..t1) of y is written by this task only; strides describe
            // in-bounds row-major blocks of y, weight and col.
            unsafe {
                let dst = y_ptr.get().add(b * s.c_out * t_out + t0);
                gemm(
                    s.c_out,
                    n,
                    depth,
                    dst,
                    1,
                    t_out as isize,
                    false,
                    w.as_ptr(),
                    1,
                    depth as isize,
                    col.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
}

/// Input gradient: `dx = conv1d_x_backward(dy, weight)`, overwriting `dx`.
pub fn backward_input(dy: &[f32], w: &[f32], s: &Conv1dShape, dx: &mut [f32]) {
    s.check(dx.len(), w.len(), dy.len());
    dx.iter_mut().for_each(|v| *v = 0.0);
    let (t_out, depth) = (s.t_out(), s.depth());
    let dx_ptr = SendPtr(dx.as_mut_ptr());
    let tiles = s.tiles(256);
    // A tile writes input positions [t0*stride, (t1-1)*stride + K): with tiles at least K long
    // only neighbours overlap, so even-numbered tiles of an utterance run together, then odd.
    for phase in 0..2 {
        let mut idx = Vec::new();
        let mut prev_b = usize::MAX;
        let mut i_in_b = 0;
        for (i, &(b, _, _)) in tiles.iter().enumerate() {
            if b != prev_b {
                prev_b = b;
                i_in_b = 0;
            }
            if i_in_b % 2 == phase {
                idx.push(i);
            }
            i_in_b += 1;
        }
        idx.into_par_iter().for_each_init(Vec::new, |col, i| {
            let (b, t0, t1) = tiles[i];
            let n = t1 - t0;
            col.resize(depth * n, 0.0);
            // SAFETY: col = W^T [depth, C_out] x dy_b[:, t0..t1]; in-bounds strided views. The
            // scatter touches only this tile's input span, disjoint from concurrent tiles.
            unsafe {
                gemm(
                    depth,
                    n,
                    s.c_out,
                    col.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    w.as_ptr(),
                    depth as isize,
                    1,
                    dy.as_ptr().add(b * s.c_out * t_out + t0),
                    1,
                    t_out as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                col2im_add(col, s, t0, t1, dx_ptr.get().add(b * s.c_in * s.t_in));
            }
        });
    }
}

/// Weight gradient: `dw = conv1d_weight_backward(x, dy)`, overwriting `dw`.
pub fn backward_weight(x: &[f32], dy: &[f32], s: &Conv1dShape, dw: &mut [f32]) {
    s.check(x.len(), dw.len(), dy.len());
    let (t_out, depth) = (s.t_out(), s.depth());
    // Tiles in a fixed order, each one GEMM accumulated into dw and parallel over dw's blocks
    // inside gemm: no per-thread partial sums, so the result does not depend on scheduling
    // (bit-exact resume). Longer tiles: the time axis is this GEMM's reduction depth.
    let threads = rayon::current_num_threads();
    let mut col: Vec<f32> = Vec::new();
    for (i, (b, t0, t1)) in s.tiles(1024).into_iter().enumerate() {
        let n = t1 - t0;
        col.resize(depth * n, 0.0);
        let xb = &x[b * s.c_in * s.t_in..(b + 1) * s.c_in * s.t_in];
        // im2col by input channel, in parallel (each channel fills its own K rows).
        col.par_chunks_mut(s.kernel * n)
            .enumerate()
            .for_each(|(ci, rows)| {
                let one = Conv1dShape { c_in: 1, ..*s };
                im2col(&xb[ci * s.t_in..(ci + 1) * s.t_in], &one, t0, t1, rows);
            });
        // SAFETY: dw [C_out, depth] (+)= dy_b[:, t0..t1] [C_out, n] x col^T [n, depth].
        unsafe {
            gemm(
                s.c_out,
                depth,
                n,
                dw.as_mut_ptr(),
                1,
                depth as isize,
                i > 0,
                dy.as_ptr().add(b * s.c_out * t_out + t0),
                1,
                t_out as isize,
                col.as_ptr(),
                n as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                if threads > 1 {
                    Parallelism::Rayon(threads)
                } else {
                    Parallelism::None
                },
            );
        }
    }
}

/// Straightforward reference implementations (tests and debugging).
pub mod reference {
    use super::Conv1dShape;

    /// Direct-loop forward.
    pub fn forward(x: &[f32], w: &[f32], s: &Conv1dShape) -> Vec<f32> {
        let t_out = s.t_out();
        let mut y = vec![0f32; s.batch * s.c_out * t_out];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for t in 0..t_out {
                    let mut acc = 0f64;
                    for ci in 0..s.c_in {
                        for k in 0..s.kernel {
                            acc += w[(co * s.c_in + ci) * s.kernel + k] as f64
                                * x[(b * s.c_in + ci) * s.t_in + t * s.stride + k] as f64;
                        }
                    }
                    y[(b * s.c_out + co) * t_out + t] = acc as f32;
                }
            }
        }
        y
    }

    /// Direct-loop input gradient.
    pub fn backward_input(dy: &[f32], w: &[f32], s: &Conv1dShape) -> Vec<f32> {
        let t_out = s.t_out();
        let mut dx = vec![0f64; s.batch * s.c_in * s.t_in];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for t in 0..t_out {
                    let g = dy[(b * s.c_out + co) * t_out + t] as f64;
                    for ci in 0..s.c_in {
                        for k in 0..s.kernel {
                            dx[(b * s.c_in + ci) * s.t_in + t * s.stride + k] +=
                                g * w[(co * s.c_in + ci) * s.kernel + k] as f64;
                        }
                    }
                }
            }
        }
        dx.into_iter().map(|v| v as f32).collect()
    }

    /// Direct-loop weight gradient.
    pub fn backward_weight(x: &[f32], dy: &[f32], s: &Conv1dShape) -> Vec<f32> {
        let t_out = s.t_out();
        let mut dw = vec![0f64; s.c_out * s.c_in * s.kernel];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for t in 0..t_out {
                    let g = dy[(b * s.c_out + co) * t_out + t] as f64;
                    for ci in 0..s.c_in {
                        for k in 0..s.kernel {
                            dw[(co * s.c_in + ci) * s.kernel + k] +=
                                g * x[(b * s.c_in + ci) * s.t_in + t * s.stride + k] as f64;
                        }
                    }
                }
            }
        }
        dw.into_iter().map(|v| v as f32).collect()
    }
}
