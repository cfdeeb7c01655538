//! The table's machinery: [`scenario_table!`] turns one list of scenarios into one
//! `#[test]` per scenario × mode × family (`nftables::v6::hairpin_is_masqueraded`), and
//! [`run_cell`] runs a cell or prints why it is marked.

use crate::env::{Cell, Family};

/// Cells of one scenario that are not run, and why. `mode`/`family` `None`: every one.
#[derive(Debug)]
pub struct Mark {
    pub mode: Option<&'static str>,
    pub family: Option<Family>,
    pub reason: &'static str,
}

impl Mark {
    fn covers(&self, mode: &str, family: Family) -> bool {
        self.mode.is_none_or(|m| m == mode) && self.family.is_none_or(|f| f == family)
    }

    /// `mode/family`, `*` for every one (as the README lists marks).
    pub fn cells(&self) -> String {
        format!(
            "{}/{}",
            self.mode.unwrap_or("*"),
            self.family.map_or("*".to_string(), |f| f.to_string())
        )
    }
}

/// One row of the table.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(Cell),
    pub marks: &'static [Mark],
    /// Its expected outcomes as data, when it is about Service paths: the cells check
    /// them with traffic, and `svcplane trace` must agree with them.
    pub probes: Option<&'static crate::probes::Probes>,
}

impl Scenario {
    /// Why `(mode, family)` is not run, if a mark says so.
    pub fn marked(&self, mode: &str, family: Family) -> Option<&'static str> {
        self.marks
            .iter()
            .find(|m| m.covers(mode, family))
            .map(|m| m.reason)
    }
}

/// Run `name` of `table` in (`mode`, `family`), unless a mark covers that cell: then say
/// so, visibly, instead of passing silently.
pub fn run_cell(table: &[Scenario], mode: &'static str, family: Family, name: &str) {
    let scenario = table
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("scenario {name} is not in the table"));
    if let Some(reason) = scenario.marked(mode, family) {
        // Straight to stderr, not through `eprintln!`, which the test harness captures
        // and hides for a passing test.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIP {mode}/{family}/{name}: {reason}");
        return;
    }
    (scenario.run)(Cell { mode, family });
}

/// `scenario_table! { modes: [m1, m2]; scenarios: [s1 = S1_PROBES, s2 { mode/family: "why" }, ...] }`
/// defines `MODES`, `TABLE` and a module per mode with `v4` and `v6` test modules. A
/// mark's mode or family may be `_` (every one); `= PROBES` names the scenario's
/// [`crate::probes::Probes`].
macro_rules! scenario_table {
    (@table [$($name:ident $(= $probes:ident)? $({$($mode:tt / $family:tt : $reason:literal),* $(,)?})?),* $(,)?]) => {
        &[$($crate::table::Scenario {
            name: stringify!($name),
            run: $name,
            marks: &[$($($crate::table::Mark {
                mode: scenario_table!(@mode $mode),
                family: scenario_table!(@family $family),
                reason: $reason,
            }),*)?],
            probes: scenario_table!(@probes $($probes)?),
        }),*]
    };
    (@probes) => { None };
    (@probes $probes:ident) => { Some(&$probes) };
    (@mode _) => { None };
    (@mode $mode:ident) => { Some(stringify!($mode)) };
    (@family _) => { None };
    (@family v4) => { Some($crate::env::Family::V4) };
    (@family v6) => { Some($crate::env::Family::V6) };
    (@tests $mode:ident $family:ident [$($name:ident $(= $probes:ident)? $({$($mark:tt)*})?),* $(,)?]) => {
        $(
            #[test]
            fn $name() {
                $crate::table::run_cell(
                    $crate::TABLE,
                    stringify!($mode),
                    $crate::env::Family::$family,
                    stringify!($name),
                );
            }
        )*
    };
    (modes: [$($mode:ident),* $(,)?]; scenarios: $scenarios:tt $(;)?) => {
        /// The `--proxy-mode` values the table runs against.
        pub const MODES: &[&str] = &[$(stringify!($mode)),*];
        /// Every scenario, with its marks.
        pub const TABLE: &[$crate::table::Scenario] = scenario_table!(@table $scenarios);
        $(
            mod $mode {
                mod v4 {
                    scenario_table!(@tests $mode V4 $scenarios);
                }
                mod v6 {
                    scenario_table!(@tests $mode V6 $scenarios);
                }
            }
        )*
    };
}
