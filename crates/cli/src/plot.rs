//! Training curves as PNG (with a built-in 5x7 bitmap font, so no font or system library is
//! needed) and as a self-contained SVG.

use std::path::Path;

use fedhubert_fl::RoundRecord;

/// One curve: label, colour (`#rrggbb`) and `(x, y)` points.
pub type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Plots train loss, eval loss and eval masked accuracy per round.
pub fn curves(history: &[RoundRecord], path: &Path) -> anyhow::Result<()> {
    curves_with(history, vec![], "fedhubert federated pretraining", path)
}

/// [`curves`] plus `extra` series, under `title`.
pub fn curves_with(
    history: &[RoundRecord],
    extra: Vec<Series<'_>>,
    title: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let mut series: Vec<Series<'_>> = vec![
        (
            "train loss",
            "#1f77b4",
            history
                .iter()
                .filter_map(|r| r.train.get("loss").map(|v| (r.round as f64, *v)))
                .collect(),
        ),
        (
            "eval loss",
            "#d62728",
            history
                .iter()
                .filter_map(|r| r.eval.get("loss").map(|v| (r.round as f64, *v)))
                .collect(),
        ),
        (
            "eval acc_masked x10",
            "#2ca02c",
            history
                .iter()
                .filter_map(|r| {
                    r.eval
                        .get("acc_masked")
                        .map(|v| (r.round as f64, *v * 10.0))
                })
                .collect(),
        ),
    ];
    series.extend(extra);
    write_chart(&series, "round", title, path)
}

/// Writes `path` with extension `.png` and `.svg` (atomically), the same chart in both.
pub fn write_chart(
    series: &[Series<'_>],
    xlabel: &str,
    title: &str,
    path: &Path,
) -> anyhow::Result<()> {
    fedhubert_fl::atomic_write(
        &path.with_extension("svg"),
        svg(series, xlabel, title).as_bytes(),
    )?;
    fedhubert_fl::atomic_write(&path.with_extension("png"), &png(series, xlabel, title)?)?;
    Ok(())
}

/// A line chart of named series (x, y) with axes and a legend.
pub fn svg(series: &[Series<'_>], xlabel: &str, title: &str) -> String {
    let (w, h, m) = (720.0, 420.0, 60.0);
    let (x0, x1, y0, y1) = ranges(series);
    let sx = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n",
        w / 2.0
    );
    s += &format!(
        "<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - m,
        w - m,
        h - m
    );
    s += &format!(
        "<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - m
    );
    for i in 0..=5 {
        let yv = y0 + (y1 - y0) * i as f64 / 5.0;
        let xv = x0 + (x1 - x0) * i as f64 / 5.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.3}</text>\n",
            m - 6.0,
            sy(yv) + 4.0,
            yv
        );
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>\n",
            sx(xv),
            h - m + 18.0,
            xv
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xlabel}</text>\n",
        w / 2.0,
        h - 16.0
    );
    for (i, (name, color, p)) in series.iter().enumerate() {
        if !p.is_empty() {
            let path: Vec<String> = p
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
                path.join(" ")
            );
            for (x, y) in p {
                s += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                    sx(*x),
                    sy(*y)
                );
            }
        }
        let ly = m + 16.0 * i as f64;
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            w - m - 150.0,
            ly,
            w - m - 132.0,
            ly + 5.0
        );
    }
    s + "</svg>\n"
}

/// Axis ranges over all finite points: x as is, y from min(0, y) to 5 % above the top.
fn ranges(series: &[Series<'_>]) -> (f64, f64, f64, f64) {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1) = if pts.is_empty() {
        (0.0, 1.0)
    } else if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x1 + 1.0)
    };
    let (y0, y1) = if pts.is_empty() {
        (0.0, 1.0)
    } else if y1 > y0 {
        (y0.min(0.0), y1 * 1.05)
    } else {
        (y0 - 1.0, y1 + 1.0)
    };
    (x0, x1, y0, y1)
}

/// A tick label without trailing zeros: 0.250 -> 0.25, 3.000 -> 3.
fn tick(v: f64, decimals: usize) -> String {
    let t = format!("{v:.decimals$}");
    if t.contains('.') {
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        t
    }
}

/// The chart of [`svg`] rasterised to an RGB PNG.
pub fn png(series: &[Series<'_>], xlabel: &str, title: &str) -> anyhow::Result<Vec<u8>> {
    let (w, h, m) = (960i32, 600i32, 80i32);
    let (x0, x1, y0, y1) = ranges(series);
    let sx = |x: f64| m as f64 + (x - x0) / (x1 - x0) * (w - 2 * m) as f64;
    // The legend gets its own band above the data, so no line runs under it.
    let legend_h = 22 * series.len() as i32 + 8;
    let top = m + legend_h;
    let sy = |y: f64| (h - m) as f64 - (y - y0) / (y1 - y0) * (h - m - top) as f64;
    let mut c = Canvas::new(w, h);
    let black = [0, 0, 0];
    let grey = [220, 220, 220];
    c.text((w - text_width(title, 3)) / 2, 14, title, 3, black);
    for i in 0..=5 {
        let yv = y0 + (y1 - y0) * i as f64 / 5.0;
        let py = sy(yv).round() as i32;
        c.line(m, py, w - m, py, 1, grey);
        let yl = tick(yv, 3);
        c.text(m - 8 - text_width(&yl, 2), py - 7, &yl, 2, black);
    }
    // Whole-number x (rounds, steps): ticks on whole numbers only.
    let step = if x1 - x0 <= 10.0 {
        1.0
    } else {
        ((x1 - x0) / 5.0).ceil()
    };
    let mut xv = x0.ceil();
    while xv <= x1 + 1e-9 {
        let px = sx(xv).round() as i32;
        c.line(px, h - m, px, h - m + 6, 2, black);
        let xl = tick(xv, 0);
        c.text(px - text_width(&xl, 2) / 2, h - m + 12, &xl, 2, black);
        xv += step;
    }
    for (_, color, p) in series {
        let rgb = hex(color);
        let pts: Vec<(i32, i32)> = p
            .iter()
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| (sx(*x).round() as i32, sy(*y).round() as i32))
            .collect();
        for win in pts.windows(2) {
            c.line(win[0].0, win[0].1, win[1].0, win[1].1, 3, rgb);
        }
        for &(x, y) in &pts {
            c.rect(x - 4, y - 4, 9, 9, rgb);
        }
    }
    let legend_w = series.iter().map(|s| text_width(s.0, 2)).max().unwrap_or(0) + 44;
    c.line(m, h - m, w - m, h - m, 2, black);
    c.line(m, top, m, h - m, 2, black);
    c.text((w - text_width(xlabel, 2)) / 2, h - 34, xlabel, 2, black);
    for (i, (name, color, _)) in series.iter().enumerate() {
        let ly = m + 22 * i as i32;
        c.rect(w - m - legend_w, ly + 4, 22, 5, hex(color));
        c.text(w - m - legend_w + 30, ly, name, 2, black);
    }
    c.encode()
}

fn hex(color: &str) -> [u8; 3] {
    let v = u32::from_str_radix(color.trim_start_matches('#'), 16).unwrap_or(0);
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

struct Canvas {
    w: i32,
    h: i32,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: i32, h: i32) -> Self {
        Self {
            w,
            h,
            px: vec![255; (w * h * 3) as usize],
        }
    }

    fn set(&mut self, x: i32, y: i32, rgb: [u8; 3]) {
        if (0..self.w).contains(&x) && (0..self.h).contains(&y) {
            let o = ((y * self.w + x) * 3) as usize;
            self.px[o..o + 3].copy_from_slice(&rgb);
        }
    }

    fn rect(&mut self, x: i32, y: i32, w: i32, h: i32, rgb: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, rgb);
            }
        }
    }

    /// A line `width` pixels thick (Bresenham, stamping a square at every step).
    fn line(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, width: i32, rgb: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (stx, sty) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let off = width / 2;
        loop {
            self.rect(x - off, y - off, width, width, rgb);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += stx;
            }
            if e2 <= dx {
                err += dx;
                y += sty;
            }
        }
    }

    fn text(&mut self, x: i32, y: i32, s: &str, scale: i32, rgb: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + i as i32 * 6 * scale;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.rect(gx + col * scale, y + r as i32 * scale, scale, scale, rgb);
                    }
                }
            }
        }
    }

    fn encode(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = ::png::Encoder::new(&mut out, self.w as u32, self.h as u32);
        enc.set_color(::png::ColorType::Rgb);
        enc.set_depth(::png::BitDepth::Eight);
        let mut wr = enc.write_header()?;
        wr.write_image_data(&self.px)?;
        wr.finish()?;
        Ok(out)
    }
}

fn text_width(s: &str, scale: i32) -> i32 {
    s.chars().count() as i32 * 6 * scale
}

/// 5x7 bitmap glyphs, one row per byte (bit 4 = leftmost column); lower case is drawn as upper
/// case, anything unknown as a blank.
fn glyph(c: char) -> [u8; 7] {
    const G: &[(char, [u8; 7])] = &[
        ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
        ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
        ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
        ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
        ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
        ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
        ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
        ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
        ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
        ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
        ('A', [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
        ('B', [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E]),
        ('C', [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E]),
        ('D', [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C]),
        ('E', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F]),
        ('F', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10]),
        ('G', [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F]),
        ('H', [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
        ('I', [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
        ('J', [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C]),
        ('K', [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]),
        ('L', [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F]),
        ('M', [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11]),
        ('N', [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]),
        ('O', [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
        ('P', [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10]),
        ('Q', [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D]),
        ('R', [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11]),
        ('S', [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E]),
        ('T', [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
        ('U', [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
        ('V', [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04]),
        ('W', [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A]),
        ('X', [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11]),
        ('Y', [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04]),
        ('Z', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F]),
        ('.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C]),
        ('-', [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00]),
        ('_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F]),
        (':', [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00]),
        ('(', [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02]),
        (')', [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08]),
        ('/', [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00]),
        ('%', [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03]),
        ('+', [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00]),
        ('=', [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00]),
        (',', [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08]),
    ];
    let c = c.to_ascii_uppercase();
    G.iter()
        .find(|(k, _)| *k == c)
        .map(|(_, g)| *g)
        .unwrap_or([0; 7])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_chart_decodes_and_draws_the_series() {
        let series = vec![
            (
                "train loss",
                "#1f77b4",
                vec![(1.0, 4.5), (2.0, 4.2), (3.0, 4.0)],
            ),
            ("eval loss", "#d62728", vec![(1.0, 4.6), (3.0, 4.4)]),
        ];
        let bytes = png(&series, "round", "test chart").unwrap();
        let dec = ::png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (960, 600));
        let count = |rgb: [u8; 3]| buf.chunks(3).filter(|p| *p == rgb).count();
        // Both series' colours and black text/axes are drawn; the canvas is mostly white.
        assert!(count([0x1f, 0x77, 0xb4]) > 200, "blue series missing");
        assert!(count([0xd6, 0x27, 0x28]) > 200, "red series missing");
        assert!(count([0, 0, 0]) > 1000, "axes/text missing");
        assert!(count([255, 255, 255]) > 960 * 600 / 2);
    }
}
