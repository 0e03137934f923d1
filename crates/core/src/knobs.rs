//! Tuning knobs read from the environment, so alternatives can be measured on a GPU without a
//! rebuild; each backend's defaults are the values its measurements chose (docs/perf.md).

use std::ops::RangeInclusive;

/// `name`'s value when it is set to a number within `range`; otherwise `None` (the caller's
/// default applies).
pub fn env_knob(name: &str, range: RangeInclusive<usize>) -> Option<usize> {
    parse_knob(std::env::var(name).ok().as_deref(), range)
}

/// Whether the on/off knob `name` (a diagnostic or an opt-in path) is on: set to exactly `1`.
pub fn env_flag(name: &str) -> bool {
    is_on(std::env::var(name).ok().as_deref())
}

fn is_on(value: Option<&str>) -> bool {
    value == Some("1")
}

fn parse_knob(value: Option<&str>, range: RangeInclusive<usize>) -> Option<usize> {
    value
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|v| range.contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_take_numbers_in_range_only() {
        assert_eq!(parse_knob(Some("8"), 1..=64), Some(8));
        assert_eq!(parse_knob(Some(" 0 "), 0..=64), Some(0));
        assert_eq!(parse_knob(Some("0"), 1..=64), None);
        assert_eq!(parse_knob(Some("65"), 1..=64), None);
        assert_eq!(parse_knob(Some("eight"), 1..=64), None);
        assert_eq!(parse_knob(None, 1..=64), None);
        assert_eq!(env_knob("QFUSE_TEST_KNOB_NEVER_SET", 0..=8), None);
    }

    #[test]
    fn flags_are_on_only_at_one() {
        assert!(is_on(Some("1")));
        for off in [Some("0"), Some(" 1"), Some("yes"), Some(""), None] {
            assert!(!is_on(off), "{off:?}");
        }
        assert!(!env_flag("QFUSE_TEST_FLAG_NEVER_SET"));
    }
}
