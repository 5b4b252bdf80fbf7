//! The 3×3 location grid and AnomalyGPT's exact answer grammar
//! (`../shared/design/method.md`, quoted from the reference code).

use serde::{Deserialize, Serialize};

/// A 3×3 grid cell. Cells are cut at 1/3 and 2/3 of width and height; a region's cell is the
/// cell of its centre.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Cell {
    TopLeft,
    Top,
    TopRight,
    Left,
    Center,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl Cell {
    pub const ALL: [Cell; 9] = [
        Cell::TopLeft,
        Cell::Top,
        Cell::TopRight,
        Cell::Left,
        Cell::Center,
        Cell::Right,
        Cell::BottomLeft,
        Cell::Bottom,
        Cell::BottomRight,
    ];

    /// The words the answer grammar uses for this cell.
    pub fn name(self) -> &'static str {
        match self {
            Cell::TopLeft => "top left",
            Cell::Top => "top",
            Cell::TopRight => "top right",
            Cell::Left => "left",
            Cell::Center => "center",
            Cell::Right => "right",
            Cell::BottomLeft => "bottom left",
            Cell::Bottom => "bottom",
            Cell::BottomRight => "bottom right",
        }
    }

    pub fn from_name(s: &str) -> Option<Cell> {
        Cell::ALL.into_iter().find(|c| c.name() == s)
    }

    /// Row-major index 0..9.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The cell holding point (x, y) of an image `width` × `height` (cuts at 1/3 and 2/3).
    pub fn of_point(x: f64, y: f64, width: f64, height: f64) -> Cell {
        let col = band(x / width);
        let row = band(y / height);
        Cell::ALL[row * 3 + col]
    }
}

fn band(t: f64) -> usize {
    if t < 1.0 / 3.0 {
        0
    } else if t < 2.0 / 3.0 {
        1
    } else {
        2
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The normal answer, verbatim.
pub const NORMAL_ANSWER: &str = "No, there is no anomaly in the image.";

/// Builds the answer sentence for the cells of the anomalous regions (one entry per region,
/// in region order; an empty slice is the normal answer).
pub fn answer(cells: &[Cell]) -> String {
    match cells {
        [] => NORMAL_ANSWER.to_string(),
        [one] => format!("Yes, there is an anomaly in the image, at the {} of the image.", one.name()),
        many => {
            let (last, head) = many.split_last().expect("non-empty");
            let head: Vec<&str> = head.iter().map(|c| c.name()).collect();
            format!(
                "Yes, there are {} anomalies in the image, they are at the {} and {} of the image.",
                many.len(),
                head.join(", "),
                last.name()
            )
        }
    }
}

/// Parses an answer sentence back into its cells (`Some(vec![])` for the normal answer);
/// `None` if the sentence is not in the grammar.
pub fn parse_answer(s: &str) -> Option<Vec<Cell>> {
    if s == NORMAL_ANSWER {
        return Some(vec![]);
    }
    if let Some(rest) = s.strip_prefix("Yes, there is an anomaly in the image, at the ") {
        let pos = rest.strip_suffix(" of the image.")?;
        return Cell::from_name(pos).map(|c| vec![c]);
    }
    let rest = s.strip_prefix("Yes, there are ")?;
    let (n, rest) = rest.split_once(" anomalies in the image, they are at the ")?;
    let n: usize = n.parse().ok()?;
    let list = rest.strip_suffix(" of the image.")?;
    let (head, last) = list.rsplit_once(" and ")?;
    let mut cells: Vec<Cell> = head.split(", ").map(Cell::from_name).collect::<Option<_>>()?;
    cells.push(Cell::from_name(last)?);
    (cells.len() == n && n >= 2).then_some(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_match_reference_grammar() {
        assert_eq!(answer(&[]), "No, there is no anomaly in the image.");
        assert_eq!(answer(&[Cell::TopLeft]), "Yes, there is an anomaly in the image, at the top left of the image.");
        assert_eq!(
            answer(&[Cell::Top, Cell::Center, Cell::BottomRight]),
            "Yes, there are 3 anomalies in the image, they are at the top, center and bottom right of the image."
        );
        assert_eq!(
            answer(&[Cell::Left, Cell::Right]),
            "Yes, there are 2 anomalies in the image, they are at the left and right of the image."
        );
    }

    #[test]
    fn parse_roundtrips_every_form() {
        for cells in [vec![], vec![Cell::Bottom], vec![Cell::Left, Cell::Right], Cell::ALL.to_vec()] {
            assert_eq!(parse_answer(&answer(&cells)), Some(cells));
        }
        assert_eq!(parse_answer("Yes, there is an anomaly in the image, at the middle of the image."), None);
        assert_eq!(parse_answer("Maybe."), None);
    }

    #[test]
    fn cells_cut_at_thirds() {
        assert_eq!(Cell::of_point(0.0, 0.0, 90.0, 90.0), Cell::TopLeft);
        assert_eq!(Cell::of_point(29.9, 30.0, 90.0, 90.0), Cell::Left);
        assert_eq!(Cell::of_point(45.0, 45.0, 90.0, 90.0), Cell::Center);
        assert_eq!(Cell::of_point(89.0, 89.0, 90.0, 90.0), Cell::BottomRight);
        assert_eq!(Cell::of_point(60.0, 10.0, 90.0, 90.0), Cell::TopRight);
    }
}
