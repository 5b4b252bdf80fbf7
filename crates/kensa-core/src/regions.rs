//! Connected regions of binary masks: the one implementation that verdicts (regions of the
//! anomaly map above the pixel level), evaluation (PRO) and the language-model judge's labels
//! (cells of ground-truth masks) share.

use crate::grid::Cell;

/// 8-connected regions of a mask (`width` wide), as lists of pixel indices.
pub fn components(mask: &[bool], width: usize) -> Vec<Vec<usize>> {
    let h = mask.len() / width;
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    for s in 0..mask.len() {
        if !mask[s] || seen[s] {
            continue;
        }
        seen[s] = true;
        let mut stack = vec![s];
        let mut region = Vec::new();
        while let Some(i) = stack.pop() {
            region.push(i);
            let (x, y) = ((i % width) as i64, (i / width) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx >= 0 && ny >= 0 && (nx as usize) < width && (ny as usize) < h {
                        let j = ny as usize * width + nx as usize;
                        if mask[j] && !seen[j] {
                            seen[j] = true;
                            stack.push(j);
                        }
                    }
                }
            }
        }
        out.push(region);
    }
    out
}

/// The 3×3 cell of a region: the cell of its centre (the centroid of its pixels), in an image
/// `width` × `height`.
pub fn cell_of(pixels: &[usize], width: usize, height: usize) -> Cell {
    let (sx, sy) = pixels.iter().fold((0.0, 0.0), |(a, b), &i| (a + (i % width) as f64, b + (i / width) as f64));
    let n = pixels.len().max(1) as f64;
    Cell::of_point(sx / n + 0.5, sy / n + 0.5, width as f64, height as f64)
}

/// Distinct cells of a mask's regions of at least `min_pixels` pixels, sorted.
pub fn mask_cells(mask: &[bool], width: usize, height: usize, min_pixels: usize) -> Vec<Cell> {
    let mut cells: Vec<Cell> =
        components(mask, width).iter().filter(|r| r.len() >= min_pixels).map(|r| cell_of(r, width, height)).collect();
    cells.sort();
    cells.dedup();
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_8_connected() {
        let m = [true, false, false, false, true, false, false, false, true]; // a diagonal
        assert_eq!(components(&m, 3).len(), 1);
        let m = [true, false, true, false, false, false, true, false, true];
        assert_eq!(components(&m, 3).len(), 4);
    }

    #[test]
    fn a_region_lies_in_the_cell_of_its_centre() {
        // 6x6: a 2x2 block at the bottom right, a single pixel at the top left.
        let mut m = vec![false; 36];
        for i in [28, 29, 34, 35, 0] {
            m[i] = true;
        }
        assert_eq!(mask_cells(&m, 6, 6, 1), vec![Cell::TopLeft, Cell::BottomRight]);
        assert_eq!(mask_cells(&m, 6, 6, 4), vec![Cell::BottomRight], "regions under 4 pixels are ignored");
    }
}
