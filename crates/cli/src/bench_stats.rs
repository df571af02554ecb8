//! What every benchmark reports the same way: a measure's runs summed up as the median and the
//! range, and the Markdown a section of docs/benchmarks.md is made of (a heading, the command
//! and its method, a table). Benchmarks print their section on stdout and their progress on
//! stderr, so `scripts/bench` can put the sections together into the page.

/// The values one measure took over the runs of a benchmark.
#[derive(Debug, Clone, Default)]
pub struct Runs(pub Vec<f64>);

impl Runs {
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut s: Vec<f64> = self.0.iter().copied().filter(|v| !v.is_nan()).collect();
        s.sort_by(f64::total_cmp);
        s
    }

    /// The median (the mean of the two middle values of an even count); NaN without values.
    pub fn median(&self) -> f64 {
        let s = self.sorted();
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    /// "median (min–max)" with each value formatted by `f`; the value alone for one run, "–"
    /// for none.
    pub fn spread(&self, f: impl Fn(f64) -> String) -> String {
        let s = self.sorted();
        match (s.first(), s.last()) {
            (Some(lo), Some(hi)) if s.len() > 1 => {
                format!("{} ({}–{})", f(self.median()), f(*lo), f(*hi))
            }
            (Some(v), _) => f(*v),
            _ => "–".into(),
        }
    }

    /// How many runs gave a value.
    pub fn count(&self) -> usize {
        self.sorted().len()
    }

    /// A table row: `label`, the spread formatted by `f`, how many runs.
    pub fn row(&self, label: impl Into<String>, f: impl Fn(f64) -> String) -> Vec<String> {
        vec![label.into(), self.spread(f), self.count().to_string()]
    }
}

/// A Markdown table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", headers.join(" | "));
    out.push_str(&format!("|{}\n", " --- |".repeat(headers.len())));
    for r in rows {
        out.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    out
}

/// The head of a section: its title, the command that measures it, and how.
pub fn section(title: &str, command: &str, method: &str) -> String {
    let mut chars = method.chars();
    let method = chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect::<String>())
        .unwrap_or_default();
    format!("## {title}\n\n`{command}`\n\n**Method.** {method}\n")
}

/// Seconds, to the precision that means something at their size.
pub fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 100.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.0} s")
    }
}

/// Word `nth` of what `program arg` prints (a version), or "?" where it is not installed.
pub fn tool_version(program: &str, arg: &str, nth: usize) -> String {
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(nth)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

/// Drops the page cache (root only): a run that must start cold. Whether it could.
pub fn drop_page_cache() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_the_median_and_the_range() {
        let f = |x: f64| format!("{x:.0}");
        assert_eq!(Runs(vec![3.0, 1.0, 2.0]).spread(f), "2 (1–3)");
        assert_eq!(Runs(vec![4.0, 1.0]).spread(f), "2 (1–4)");
        assert_eq!(Runs(vec![5.0]).spread(f), "5");
        assert_eq!(Runs(vec![]).spread(f), "–");
        assert_eq!(Runs(vec![f64::NAN, 7.0]).spread(f), "7");
        assert!(Runs(vec![]).median().is_nan());
    }

    #[test]
    fn tables_have_a_rule_under_their_head() {
        let t = table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n| --- | --- |\n| 1 | 2 |\n");
    }
}
