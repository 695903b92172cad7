//! The weekly bandwidth schedule.
//!
//! Spec, one line, entries separated by `;`, first matching window wins:
//!
//! ```text
//! mon-fri 09:00-18:00 100mbit; sat 10:00-14:00 200mbit; other unlimited
//! ```
//!
//! Days are `mon` .. `sun`, alone or as a range (`mon-fri`, `fri-mon` wraps); times are
//! `HH:MM`, the end exclusive (`24:00` allowed); rates as in [`Rate::parse`]. `other`
//! gives the rate outside every window (default: unlimited).

use crate::bucket::Rate;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A window of the week with its rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayWindow {
    /// Indexed Monday = 0.
    pub days: [bool; 7],
    pub start_minute: u16,
    pub end_minute: u16,
    pub rate: Rate,
}

/// Rates by time of week.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeeklySchedule {
    pub windows: Vec<DayWindow>,
    pub other: Rate,
}

/// A schedule spec that does not parse, with the entry at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule entry {entry:?}: {reason}")]
pub struct ScheduleError {
    pub entry: String,
    pub reason: String,
}

impl WeeklySchedule {
    /// One rate at all times.
    pub fn constant(rate: Rate) -> Self {
        WeeklySchedule {
            windows: vec![],
            other: rate,
        }
    }

    /// The rate in force on `weekday` (Monday = 0) at `minute` of the day.
    pub fn rate_at(&self, weekday: u8, minute: u16) -> Rate {
        self.windows
            .iter()
            .find(|w| {
                w.days[weekday as usize % 7] && (w.start_minute..w.end_minute).contains(&minute)
            })
            .map(|w| w.rate)
            .unwrap_or(self.other)
    }

    pub fn parse(spec: &str) -> Result<Self, ScheduleError> {
        let mut schedule = WeeklySchedule::constant(Rate::Unlimited);
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let err = |reason: String| ScheduleError {
                entry: entry.to_string(),
                reason,
            };
            let parts: Vec<&str> = entry.split_whitespace().collect();
            match parts.as_slice() {
                ["other", rate] => schedule.other = Rate::parse(rate).map_err(err)?,
                [days, times, rate] => {
                    let days = parse_days(days).map_err(err)?;
                    let (start, end) = times
                        .split_once('-')
                        .ok_or_else(|| err(format!("expected HH:MM-HH:MM, got {times:?}")))?;
                    let (start_minute, end_minute) = (
                        parse_time(start).map_err(err)?,
                        parse_time(end).map_err(err)?,
                    );
                    if start_minute >= end_minute {
                        return Err(err(format!("{times} ends before it starts")));
                    }
                    let rate = Rate::parse(rate).map_err(err)?;
                    schedule.windows.push(DayWindow {
                        days,
                        start_minute,
                        end_minute,
                        rate,
                    });
                }
                _ => {
                    return Err(err(
                        "expected `<days> <HH:MM-HH:MM> <rate>` or `other <rate>`".into(),
                    ))
                }
            }
        }
        Ok(schedule)
    }
}

fn day_index(d: &str) -> Result<usize, String> {
    DAYS.iter()
        .position(|x| *x == d.to_ascii_lowercase())
        .ok_or_else(|| format!("unknown day {d:?}"))
}

fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (mut i, end) = (day_index(a)?, day_index(b)?);
                loop {
                    days[i] = true;
                    if i == end {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => days[day_index(part)?] = true,
        }
    }
    Ok(days)
}

fn parse_time(s: &str) -> Result<u16, String> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| format!("expected HH:MM, got {s:?}"))?;
    let (h, m): (u16, u16) = (
        h.parse().map_err(|_| format!("bad hour in {s:?}"))?,
        m.parse().map_err(|_| format!("bad minute in {s:?}"))?,
    );
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(format!("{s:?} is not a time of day"));
    }
    Ok(h * 60 + m)
}

/// Weekday (Monday = 0) and minute of the day of a Unix time, at a UTC offset in minutes.
pub fn weekday_and_minute(unix_secs: u64, utc_offset_minutes: i32) -> (u8, u16) {
    let local = unix_secs as i64 + utc_offset_minutes as i64 * 60;
    let days = local.div_euclid(86_400);
    let minute = (local.rem_euclid(86_400) / 60) as u16;
    // 1970-01-01 was a Thursday (3 with Monday = 0).
    (((days + 3).rem_euclid(7)) as u8, minute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_hours_and_other_hours() {
        let s = WeeklySchedule::parse("mon-fri 09:00-18:00 100mbit; other unlimited").unwrap();
        assert_eq!(s.rate_at(0, 9 * 60), Rate::BytesPerSec(12_500_000));
        assert_eq!(s.rate_at(4, 17 * 60 + 59), Rate::BytesPerSec(12_500_000));
        assert_eq!(s.rate_at(4, 18 * 60), Rate::Unlimited);
        assert_eq!(s.rate_at(0, 8 * 60 + 59), Rate::Unlimited);
        assert_eq!(s.rate_at(5, 12 * 60), Rate::Unlimited, "Saturday");
    }

    #[test]
    fn ranges_wrap_and_first_match_wins() {
        let s =
            WeeklySchedule::parse("fri-mon 00:00-24:00 1gbit; mon 09:00-10:00 1mbit; other 10mbit")
                .unwrap();
        assert_eq!(s.rate_at(6, 600), Rate::BytesPerSec(125_000_000), "Sunday");
        assert_eq!(
            s.rate_at(0, 9 * 60 + 30),
            Rate::BytesPerSec(125_000_000),
            "Monday: first window wins"
        );
        assert_eq!(
            s.rate_at(2, 0),
            Rate::BytesPerSec(1_250_000),
            "Wednesday: other"
        );
    }

    #[test]
    fn bad_specs_name_the_entry() {
        for (spec, needle) in [
            ("mon-fry 09:00-18:00 1mbit", "unknown day"),
            ("mon 18:00-09:00 1mbit", "ends before"),
            ("mon 09:00-25:00 1mbit", "time of day"),
            ("mon 09:00-10:00 fast", "invalid rate"),
            ("mon 1mbit", "expected"),
        ] {
            let e = WeeklySchedule::parse(spec).unwrap_err();
            assert!(e.to_string().contains(needle), "{spec}: {e}");
            assert!(
                e.to_string().contains(spec.split(';').next().unwrap()),
                "names the entry: {e}"
            );
        }
    }

    #[test]
    fn weekday_and_minute_from_unix_time() {
        assert_eq!(
            weekday_and_minute(0, 0),
            (3, 0),
            "1970-01-01 00:00 UTC was a Thursday"
        );
        // 2026-11-23 is a Monday; 09:30 UTC.
        assert_eq!(weekday_and_minute(1_795_426_200, 0), (0, 9 * 60 + 30));
        assert_eq!(
            weekday_and_minute(1_795_426_200, 60),
            (0, 10 * 60 + 30),
            "UTC+1"
        );
        assert_eq!(
            weekday_and_minute(1_795_426_200, -600),
            (6, 23 * 60 + 30),
            "UTC-10: still Sunday"
        );
    }
}
