//! Fault injection for the tests of failing loudly: `KENSA_FAULT=<point>[,<point>...]` makes
//! the named points fail as a real fault would (a libtorch error, a panic), so a test can
//! check that the daemon stops (not ready, the stage named, exit 1) instead of living on as a
//! process that inspects nothing. Unset (always, in production) it costs one load of a
//! `OnceLock` per check.

use std::sync::OnceLock;

/// A place where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Every batch the model thread scores fails with an error.
    ModelError,
    /// The delivery stage's sender panics on its first record.
    SenderPanic,
}

impl Point {
    pub fn as_str(self) -> &'static str {
        match self {
            Point::ModelError => "model-error",
            Point::SenderPanic => "sender-panic",
        }
    }
}

fn parse(v: &str) -> Vec<Point> {
    let all = [Point::ModelError, Point::SenderPanic];
    v.split(',').filter_map(|w| all.into_iter().find(|p| p.as_str() == w.trim())).collect()
}

/// Whether `KENSA_FAULT` names `point`. The first check that finds it set says so in the log
/// (a stray variable would otherwise look like a real fault).
pub fn injected(point: Point) -> bool {
    static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
    POINTS
        .get_or_init(|| {
            let points = std::env::var("KENSA_FAULT").map(|v| parse(&v)).unwrap_or_default();
            if !points.is_empty() {
                eprintln!("warning: KENSA_FAULT injects faults for tests: {points:?}");
            }
            points
        })
        .contains(&point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_named_and_unknown_names_ignored() {
        assert_eq!(parse("model-error, sender-panic,bogus"), vec![Point::ModelError, Point::SenderPanic]);
        assert!(parse("").is_empty());
    }
}
