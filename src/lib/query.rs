//! `pm-query "SQL"`: read-only SQL against the inventory for people without the DuckDB CLI,
//! printed as a table, CSV or one JSON document.

use std::io::Write;
use std::ops::ControlFlow;

use chrono::SecondsFormat;
use clap::{Parser, ValueEnum};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::activate::inventory_error;
use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::inventory::{Inventory, QueryError, QueryResult, QuerySink, QueryValue};

/// Rows a table or JSON document holds at most unless `--max-rows` says otherwise: both are
/// built in memory before anything is printed.
pub const DEFAULT_MAX_ROWS: u64 = 100_000;

/// `pm-query` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pm-query",
    version,
    about = "Run read-only SQL against the inventory and print the rows as a table, CSV or JSON"
)]
pub struct Args {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// One SQL statement, e.g. "SELECT * FROM jobs ORDER BY id DESC LIMIT 10"
    pub sql: String,
    /// Output format; `--json` is the same as `--format json`
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<Format>,
    /// Print at most N rows, 0 for all [default: 100000 for table and json, all for csv, which
    /// is written row by row]
    #[arg(long, value_name = "N")]
    pub max_rows: Option<u64>,
}

/// How rows are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table for people, then `N rows` on stderr.
    Table,
    /// A header line, then one line per row (RFC 4180); NULL is an empty field.
    Csv,
    /// One document: `changed`, `columns`, `rows` (objects by column), `row_count`, `truncated`.
    Json,
}

impl Args {
    /// The format asked for: `--format`, else `json` with `--json`, else `table`.
    pub fn output_format(&self) -> Format {
        match (self.format, self.global.json) {
            (Some(format), _) => format,
            (None, true) => Format::Json,
            (None, false) => Format::Table,
        }
    }
}

/// Runs `pm-query`.
pub fn run(args: Args) -> anyhow::Result<ExitStatus> {
    let format = args.output_format();
    if args.global.json && format != Format::Json {
        return Err(UserError::usage(format!(
            "`--json` and `--format {}` disagree",
            format
                .to_possible_value()
                .expect("no skipped formats")
                .get_name()
        ))
        .with_hint("pass one of them")
        .into());
    }
    let max_rows = match (args.max_rows, format) {
        (Some(0), _) | (None, Format::Csv) => None,
        (Some(n), _) => Some(n),
        (None, _) => Some(DEFAULT_MAX_ROWS),
    };
    let home = args.global.home();
    let Some(inventory) =
        Inventory::open_read_only(&home, args.global.lock_timeout).map_err(inventory_error)?
    else {
        return Err(UserError::usage(format!(
            "no inventory at `{}` yet",
            home.join(crate::inventory::INVENTORY_FILE).display()
        ))
        .with_hint("run pm-mirror sync or pm-activate first, which create it, or pass --home")
        .into());
    };
    if format == Format::Csv {
        let mut sink = CsvSink {
            writer: csv::Writer::from_writer(std::io::stdout().lock()),
            max_rows,
            written: 0,
        };
        let result = run_query(&inventory, &args.sql, &mut sink)?;
        sink.writer.flush()?;
        warn_truncated(&result);
        return Ok(ExitStatus::Success);
    }
    let mut sink = CollectSink {
        max_rows,
        rows: Vec::new(),
    };
    let result = run_query(&inventory, &args.sql, &mut sink)?;
    drop(inventory);
    if format == Format::Json {
        let columns = unique_names(&result.columns);
        cli::print_json(&JsonReport {
            changed: false,
            columns: &columns,
            rows: RowObjects {
                columns: &columns,
                rows: &sink.rows,
            },
            row_count: result.row_count,
            truncated: result.truncated,
        })?;
    } else {
        let header: Vec<&str> = result.columns.iter().map(String::as_str).collect();
        let mut table = cli::table(&header);
        for row in &sink.rows {
            table.add_row(row.iter().map(text));
        }
        cli::print_text(table)?;
        let plural = if result.row_count == 1 { "" } else { "s" };
        eprintln!("{} row{plural}", result.row_count);
    }
    warn_truncated(&result);
    Ok(ExitStatus::Success)
}

fn run_query(
    inventory: &Inventory,
    sql: &str,
    sink: &mut dyn QuerySink,
) -> anyhow::Result<QueryResult> {
    inventory.query(sql, sink).map_err(|err| match err {
        QueryError::Write { message } => UserError::usage(format!(
            "pm-query is read-only; DuckDB refused the statement: {message}"
        ))
        .with_hint("change the inventory with the pm tools (pm-mirror, pm-activate), not with SQL")
        .into(),
        QueryError::Sql { message } => UserError::usage(format!("query failed: {message}"))
            .with_hint(
                "check the names against the views: \
                 pm-query \"SELECT * FROM duckdb_views() WHERE NOT internal\" (tables: SHOW TABLES)",
            )
            .into(),
        // Kept as an io::Error so that `cli::finish` sees a closed pipe (`| head`).
        QueryError::Output(err) => anyhow::Error::new(err),
    })
}

fn warn_truncated(result: &QueryResult) {
    if result.truncated {
        tracing::warn!(
            rows = result.row_count,
            "stopped after --max-rows rows; raise --max-rows (0 for all) or use --format csv"
        );
    }
}

/// Whether another row fits under `--max-rows`.
fn fits(max_rows: Option<u64>, taken: u64) -> ControlFlow<()> {
    match max_rows {
        Some(max) if taken >= max => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    }
}

/// Writes each row as soon as DuckDB hands it over.
struct CsvSink<W: Write> {
    writer: csv::Writer<W>,
    max_rows: Option<u64>,
    written: u64,
}

impl<W: Write> QuerySink for CsvSink<W> {
    fn columns(&mut self, names: &[String]) -> std::io::Result<()> {
        Ok(self.writer.write_record(names)?)
    }

    fn row(&mut self, values: Vec<QueryValue>) -> std::io::Result<ControlFlow<()>> {
        let flow = fits(self.max_rows, self.written);
        if flow.is_continue() {
            self.writer.write_record(values.iter().map(text))?;
            self.written += 1;
        }
        Ok(flow)
    }
}

/// Collects rows for a table or the one JSON document, which are printed whole.
struct CollectSink {
    max_rows: Option<u64>,
    rows: Vec<Vec<QueryValue>>,
}

impl QuerySink for CollectSink {
    fn columns(&mut self, _names: &[String]) -> std::io::Result<()> {
        Ok(())
    }

    fn row(&mut self, values: Vec<QueryValue>) -> std::io::Result<ControlFlow<()>> {
        let flow = fits(self.max_rows, self.rows.len() as u64);
        if flow.is_continue() {
            self.rows.push(values);
        }
        Ok(flow)
    }
}

/// `--format json`.
#[derive(Serialize)]
struct JsonReport<'a> {
    changed: bool,
    columns: &'a [String],
    rows: RowObjects<'a>,
    row_count: u64,
    truncated: bool,
}

/// Column names made unique for JSON object keys: a second `x` becomes `x_2`.
fn unique_names(columns: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(columns.len());
    for column in columns {
        let mut name = column.clone();
        let mut n = 1;
        while names.contains(&name) {
            n += 1;
            name = format!("{column}_{n}");
        }
        names.push(name);
    }
    names
}

/// A value as one table cell or CSV field: NULL is empty, nested values are JSON text.
pub fn text(value: &QueryValue) -> String {
    match value {
        QueryValue::Null => String::new(),
        QueryValue::Bool(b) => b.to_string(),
        QueryValue::Int(i) => i.to_string(),
        QueryValue::UInt(i) => i.to_string(),
        QueryValue::Float(f) => f.to_string(),
        QueryValue::Decimal(text) | QueryValue::Text(text) => text.clone(),
        QueryValue::Blob(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        QueryValue::Date(date) => date.format("%Y-%m-%d").to_string(),
        QueryValue::Time(time) => time.format("%H:%M:%S%.f").to_string(),
        QueryValue::Timestamp(at) => at.format("%Y-%m-%dT%H:%M:%S%.f").to_string(),
        QueryValue::TimestampTz(at) => at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        QueryValue::Infinity { negative: false } => "infinity".into(),
        QueryValue::Infinity { negative: true } => "-infinity".into(),
        QueryValue::Interval {
            months,
            days,
            nanos,
        } => iso_duration(*months, *days, *nanos),
        QueryValue::List(_) | QueryValue::Struct(_) | QueryValue::Map(_) => {
            serde_json::to_string(&Json(value)).expect("JSON of plain values cannot fail")
        }
    }
}

/// An interval as ISO 8601 (`P1Y2M3DT4H5M6.5S`); each part keeps its own sign as DuckDB does.
fn iso_duration(months: i32, days: i32, nanos: i64) -> String {
    let mut out = String::from("P");
    let (years, months) = (months / 12, months % 12);
    for (amount, unit) in [
        (years as i64, 'Y'),
        (months as i64, 'M'),
        (days as i64, 'D'),
    ] {
        if amount != 0 {
            out.push_str(&format!("{amount}{unit}"));
        }
    }
    if nanos != 0 {
        out.push('T');
        let sign = if nanos < 0 { "-" } else { "" };
        let nanos = nanos.unsigned_abs();
        let (hours, minutes) = (nanos / 3_600_000_000_000, nanos / 60_000_000_000 % 60);
        let (seconds, fraction) = (nanos / 1_000_000_000 % 60, nanos % 1_000_000_000);
        if hours != 0 {
            out.push_str(&format!("{sign}{hours}H"));
        }
        if minutes != 0 {
            out.push_str(&format!("{sign}{minutes}M"));
        }
        if seconds != 0 || fraction != 0 {
            let fraction = format!("{fraction:09}");
            let fraction = fraction.trim_end_matches('0');
            let point = if fraction.is_empty() { "" } else { "." };
            out.push_str(&format!("{sign}{seconds}{point}{fraction}S"));
        }
    }
    if out == "P" {
        out.push_str("T0S");
    }
    out
}

/// A value as JSON: numbers stay numbers (HUGEINT with all its digits), nested types become
/// arrays and objects (a MAP's keys as their text), everything else a string as in [`text`].
struct Json<'a>(&'a QueryValue);

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            QueryValue::Null => serializer.serialize_unit(),
            QueryValue::Bool(b) => serializer.serialize_bool(*b),
            QueryValue::Int(i) => match i64::try_from(*i) {
                Ok(small) => serializer.serialize_i64(small),
                Err(_) => serializer.serialize_i128(*i),
            },
            QueryValue::UInt(i) => serializer.serialize_u128(*i),
            // JSON has no NaN or infinity; their text keeps them apart from NULL.
            QueryValue::Float(f) if f.is_finite() => serializer.serialize_f64(*f),
            // A double carries any decimal of up to 15 significant digits exactly.
            QueryValue::Decimal(decimal) if significant_digits(decimal) <= 15 => {
                match decimal.parse::<f64>() {
                    Ok(number) => serializer.serialize_f64(number),
                    Err(_) => serializer.serialize_str(decimal),
                }
            }
            QueryValue::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Json(item))?;
                }
                seq.end()
            }
            QueryValue::Struct(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (name, value) in fields {
                    map.serialize_entry(name, &Json(value))?;
                }
                map.end()
            }
            QueryValue::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(&text(key), &Json(value))?;
                }
                map.end()
            }
            other => serializer.serialize_str(&text(other)),
        }
    }
}

fn significant_digits(decimal: &str) -> usize {
    decimal
        .chars()
        .filter(char::is_ascii_digit)
        .skip_while(|&digit| digit == '0')
        .count()
}

/// Rows as `[{column: value}, ...]`.
struct RowObjects<'a> {
    columns: &'a [String],
    rows: &'a [Vec<QueryValue>],
}

impl Serialize for RowObjects<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.rows.len()))?;
        for row in self.rows {
            seq.serialize_element(&RowObject {
                columns: self.columns,
                row,
            })?;
        }
        seq.end()
    }
}

/// One row as `{column: value}`.
struct RowObject<'a> {
    columns: &'a [String],
    row: &'a [QueryValue],
}

impl Serialize for RowObject<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.row.len()))?;
        for (column, value) in self.columns.iter().zip(self.row) {
            map.serialize_entry(column, &Json(value))?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: QueryValue, expected_text: &str, expected_json: &str) {
        assert_eq!(text(&value), expected_text, "text of {value:?}");
        assert_eq!(
            serde_json::to_string(&Json(&value)).unwrap(),
            expected_json,
            "JSON of {value:?}"
        );
    }

    #[test]
    fn values_print_as_text_and_json() {
        check(QueryValue::Null, "", "null");
        check(QueryValue::Bool(true), "true", "true");
        check(
            QueryValue::Int(i128::MAX),
            "170141183460469231731687303715884105727",
            "170141183460469231731687303715884105727",
        );
        check(
            QueryValue::UInt(u128::MAX),
            &u128::MAX.to_string(),
            &u128::MAX.to_string(),
        );
        check(QueryValue::Float(0.5), "0.5", "0.5");
        check(QueryValue::Float(f64::NAN), "NaN", "\"NaN\"");
        check(QueryValue::Decimal("12.50".into()), "12.50", "12.5");
        check(
            QueryValue::Decimal("1234567890.1234567890".into()),
            "1234567890.1234567890",
            "\"1234567890.1234567890\"",
        );
        check(QueryValue::Blob(vec![0, 0xab]), "00ab", "\"00ab\"");
        check(
            QueryValue::Interval {
                months: 14,
                days: 3,
                nanos: 3_723_500_000_000,
            },
            "P1Y2M3DT1H2M3.5S",
            "\"P1Y2M3DT1H2M3.5S\"",
        );
        check(
            QueryValue::Interval {
                months: 0,
                days: 0,
                nanos: 0,
            },
            "PT0S",
            "\"PT0S\"",
        );
        check(
            QueryValue::Map(vec![(
                QueryValue::Int(1),
                QueryValue::List(vec![QueryValue::Text("a".into()), QueryValue::Null]),
            )]),
            r#"{"1":["a",null]}"#,
            r#"{"1":["a",null]}"#,
        );
    }

    #[test]
    fn repeated_column_names_get_a_number_in_json() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unique_names(&names(&["1", "1", "x", "1"])),
            names(&["1", "1_2", "x", "1_3"])
        );
    }
}
