//! Arbitrary SQL for `pm-query`: one statement run on a read-only connection, its rows handed
//! over one at a time as [`QueryValue`]s so that no module but `inventory` sees DuckDB's types.

use std::collections::HashSet;
use std::ops::ControlFlow;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use duckdb::arrow::datatypes::DataType;
use duckdb::types::{TimeUnit, Value};
use serde_json::Value as Json;

use super::Inventory;

/// One value of a query result, typed just enough to print it as text or JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryValue {
    /// SQL `NULL`.
    Null,
    /// `BOOLEAN`.
    Bool(bool),
    /// Any signed integer, `TINYINT` to `HUGEINT`, and the unsigned ones up to `UBIGINT`.
    Int(i128),
    /// `UHUGEINT`, which may not fit an `i128`.
    UInt(u128),
    /// `FLOAT` or `DOUBLE`.
    Float(f64),
    /// `DECIMAL`, exactly as DuckDB scales it (`12.50`).
    Decimal(String),
    /// `VARCHAR`, `ENUM`, `UUID` and anything else DuckDB hands over as text.
    Text(String),
    /// `BLOB` and `GEOMETRY` (WKB) bytes.
    Blob(Vec<u8>),
    /// `DATE`.
    Date(NaiveDate),
    /// `TIME`.
    Time(NaiveTime),
    /// `TIMESTAMP` (no time zone).
    Timestamp(NaiveDateTime),
    /// `TIMESTAMPTZ`, an instant.
    TimestampTz(DateTime<Utc>),
    /// A date or timestamp outside chrono's range: DuckDB's `infinity` / `-infinity`.
    Infinity {
        /// `-infinity`.
        negative: bool,
    },
    /// `INTERVAL`: DuckDB keeps months, days and the rest apart.
    Interval {
        /// Months (a year is 12).
        months: i32,
        /// Days.
        days: i32,
        /// Nanoseconds.
        nanos: i64,
    },
    /// `LIST` or `ARRAY`.
    List(Vec<QueryValue>),
    /// `STRUCT`: fields in declaration order.
    Struct(Vec<(String, QueryValue)>),
    /// `MAP`: entries in their order.
    Map(Vec<(QueryValue, QueryValue)>),
}

/// What a query produced.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    /// Column names in order.
    pub columns: Vec<String>,
    /// Rows the sink took.
    pub row_count: u64,
    /// The sink stopped before the last row.
    pub truncated: bool,
}

/// Where rows go as DuckDB hands them over, so that a big result is never held twice.
pub trait QuerySink {
    /// Called once, before any row, with the column names.
    fn columns(&mut self, names: &[String]) -> std::io::Result<()>;
    /// Called per row; `Break` refuses this row and ends the query.
    fn row(&mut self, values: Vec<QueryValue>) -> std::io::Result<ControlFlow<()>>;
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement tried to change something: the inventory, a file, another database.
    #[error("{message}")]
    Write {
        /// DuckDB's message.
        message: String,
    },
    /// DuckDB rejected or failed the statement (syntax, unknown table, bad cast).
    #[error("{message}")]
    Sql {
        /// DuckDB's message.
        message: String,
    },
    /// Writing the result failed.
    #[error(transparent)]
    Output(#[from] std::io::Error),
}

impl QueryError {
    fn from_duckdb(err: duckdb::Error) -> QueryError {
        let message = err.to_string();
        // DuckDB refuses writes on a read-only database with "... attached in read-only mode!",
        // and file access (COPY TO, ATTACH, INSTALL) with "Permission Error: ... disabled by
        // configuration" once external access is off.
        let refused = ["read-only mode", "read-only", "Permission Error"]
            .iter()
            .any(|marker| message.contains(marker));
        if refused {
            QueryError::Write { message }
        } else {
            QueryError::Sql { message }
        }
    }
}

/// The statement a `--where` predicate is put in; the predicate goes between the parentheses,
/// on a line of its own so that a `--` comment in it cannot swallow the closing one.
const WHERE_STATEMENT: [&str; 2] = ["SELECT host FROM fleet_status WHERE (\n", "\n)"];

impl Inventory {
    /// The sandbox of SQL that comes from a person (`pm-query`, `--where`): on top of the
    /// read-only connection ([`Inventory::open_read_only`]), file system access is switched
    /// off, so `read_text`, `read_csv`, `COPY ... TO`, `ATTACH` or `INSTALL` cannot read or write
    /// anywhere. DuckDB refuses to switch it back on while the database is open, so the SQL
    /// itself cannot undo it.
    fn sandbox(&self) -> Result<(), QueryError> {
        self.conn
            // UTC so that casts and strftime in the SQL agree with the UTC the rows print in.
            .execute_batch("SET enable_external_access = false; SET TimeZone = 'UTC'")
            .map_err(QueryError::from_duckdb)
    }

    /// Runs one SQL statement from a person (`pm-query`) and hands its rows to `sink`, in the
    /// sandbox (`Inventory::sandbox`): read-only, no file access.
    pub fn query(&self, sql: &str, sink: &mut dyn QuerySink) -> Result<QueryResult, QueryError> {
        self.sandbox()?;
        let mut statement = self.conn.prepare(sql).map_err(QueryError::from_duckdb)?;
        let mut rows = statement.query([]).map_err(QueryError::from_duckdb)?;
        let executed = rows
            .as_ref()
            .expect("rows of an executed statement have their statement");
        let columns = executed.column_names();
        let types: Vec<DataType> = (0..columns.len())
            .map(|index| executed.column_type(index))
            .collect();
        sink.columns(&columns)?;
        let mut result = QueryResult {
            columns,
            row_count: 0,
            truncated: false,
        };
        while let Some(row) = rows.next().map_err(QueryError::from_duckdb)? {
            let mut values = Vec::with_capacity(types.len());
            for (index, data_type) in types.iter().enumerate() {
                let value: Value = row.get(index).map_err(QueryError::from_duckdb)?;
                values.push(convert(value, Some(data_type)));
            }
            if sink.row(values)?.is_break() {
                result.truncated = true;
                break;
            }
            result.row_count += 1;
        }
        Ok(result)
    }
}

impl Inventory {
    /// Hosts for which `predicate` (SQL, `--where`) holds on `fleet_status`, run in pm-query's
    /// sandbox (`Inventory::sandbox`). The predicate must be one condition: DuckDB's own parser
    /// reads the statement it is put in, and anything but the `WHERE` clause that differs from
    /// the statement with `TRUE` in its place (a closing parenthesis followed by `UNION`,
    /// `ORDER BY`, `LIMIT`, `GROUP BY`, a second statement, a comment eating the closing
    /// parenthesis) is refused before anything runs.
    pub fn hosts_where(&self, predicate: &str) -> Result<HashSet<String>, QueryError> {
        self.sandbox()?;
        let [head, tail] = WHERE_STATEMENT;
        let sql = format!("{head}{predicate}{tail}");
        let without_where = |sql: &str| -> Result<Json, QueryError> {
            let mut tree = self.parse_tree(sql)?;
            let statements = tree["statements"].as_array_mut();
            match statements.map(|s| s.as_mut_slice()) {
                Some([statement]) => Ok(statement["node"]
                    .as_object_mut()
                    .and_then(|node| node.remove("where_clause"))
                    .map(|_| statement["node"].take())
                    .unwrap_or_default()),
                _ => Ok(Json::Null),
            }
        };
        let expected = without_where(&format!("{head}TRUE{tail}"))?;
        if expected.is_null() || without_where(&sql)? != expected {
            return Err(QueryError::Sql {
                message: "it is not one condition: it ends the parentheses it is put in and \
                          adds to the statement"
                    .into(),
            });
        }
        let mut statement = self.conn.prepare(&sql).map_err(QueryError::from_duckdb)?;
        let rows = statement
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(QueryError::from_duckdb)?;
        rows.map(|row| row.map_err(QueryError::from_duckdb))
            .collect()
    }

    /// DuckDB's parse tree of `sql` (`json_serialize_sql`: SELECT statements only); a
    /// statement it cannot parse is an error with DuckDB's message.
    fn parse_tree(&self, sql: &str) -> Result<Json, QueryError> {
        let text: String = self
            .conn
            .query_row(
                "SELECT json_serialize_sql(?::VARCHAR)::VARCHAR",
                [sql],
                |row| row.get(0),
            )
            .map_err(QueryError::from_duckdb)?;
        let tree: Json = serde_json::from_str(&text).map_err(|err| QueryError::Sql {
            message: format!("DuckDB's parse tree is not JSON: {err}"),
        })?;
        if tree["error"] != Json::Bool(false) {
            return Err(QueryError::Sql {
                message: tree["error_message"]
                    .as_str()
                    .unwrap_or("DuckDB cannot parse it")
                    .to_string(),
            });
        }
        Ok(tree)
    }
}

/// Converts DuckDB's value, using its Arrow type where the value alone is ambiguous (a
/// `TIMESTAMP` and a `TIMESTAMPTZ` arrive the same way) and where nested types are known.
fn convert(value: Value, data_type: Option<&DataType>) -> QueryValue {
    match value {
        Value::Null => QueryValue::Null,
        Value::Boolean(b) => QueryValue::Bool(b),
        Value::TinyInt(i) => QueryValue::Int(i.into()),
        Value::SmallInt(i) => QueryValue::Int(i.into()),
        Value::Int(i) => QueryValue::Int(i.into()),
        Value::BigInt(i) => QueryValue::Int(i.into()),
        Value::HugeInt(i) => QueryValue::Int(i),
        Value::UTinyInt(i) => QueryValue::Int(i.into()),
        Value::USmallInt(i) => QueryValue::Int(i.into()),
        Value::UInt(i) => QueryValue::Int(i.into()),
        Value::UBigInt(i) => QueryValue::Int(i.into()),
        Value::UHugeInt(i) => QueryValue::UInt(i),
        // Through its shortest text so that 0.1::FLOAT stays 0.1, not 0.10000000149011612.
        Value::Float(f) => QueryValue::Float(f.to_string().parse().unwrap_or(f64::from(f))),
        Value::Double(f) => QueryValue::Float(f),
        Value::Decimal(d) => QueryValue::Decimal(d.to_string()),
        Value::Text(s) | Value::Enum(s) => QueryValue::Text(s),
        Value::Blob(bytes) | Value::Geometry(bytes) => QueryValue::Blob(bytes),
        // Days since 1970-01-01; chrono counts from 0001-01-01 (719 163 days earlier).
        Value::Date32(days) => NaiveDate::from_num_days_from_ce_opt(days.saturating_add(719_163))
            .map(QueryValue::Date)
            .unwrap_or(QueryValue::Infinity { negative: days < 0 }),
        Value::Time64(unit, time) => {
            let micros = unit.to_micros(time);
            NaiveTime::from_num_seconds_from_midnight_opt(
                (micros / 1_000_000) as u32,
                ((micros % 1_000_000) * 1000) as u32,
            )
            .map(QueryValue::Time)
            .unwrap_or(QueryValue::Text(micros.to_string()))
        }
        Value::Timestamp(unit, time) => {
            let zoned = !matches!(data_type, Some(DataType::Timestamp(_, None)));
            match timestamp(unit, time) {
                Some(at) if zoned => QueryValue::TimestampTz(at),
                Some(at) => QueryValue::Timestamp(at.naive_utc()),
                None => QueryValue::Infinity { negative: time < 0 },
            }
        }
        Value::Interval {
            months,
            days,
            nanos,
        } => QueryValue::Interval {
            months,
            days,
            nanos,
        },
        Value::List(items) | Value::Array(items) => {
            let item_type = match data_type {
                Some(
                    DataType::List(field)
                    | DataType::LargeList(field)
                    | DataType::FixedSizeList(field, _),
                ) => Some(field.data_type()),
                _ => None,
            };
            QueryValue::List(
                items
                    .into_iter()
                    .map(|item| convert(item, item_type))
                    .collect(),
            )
        }
        Value::Struct(fields) => {
            let field_types = match data_type {
                Some(DataType::Struct(field_types)) => Some(field_types),
                _ => None,
            };
            QueryValue::Struct(
                fields
                    .iter()
                    .enumerate()
                    .map(|(index, (name, value))| {
                        let field_type = field_types
                            .and_then(|types| types.get(index))
                            .map(|field| field.data_type());
                        (name.clone(), convert(value.clone(), field_type))
                    })
                    .collect(),
            )
        }
        Value::Map(entries) => {
            let (key_type, value_type) = match data_type {
                Some(DataType::Map(entry, _)) => match entry.data_type() {
                    DataType::Struct(pair) if pair.len() == 2 => {
                        (Some(pair[0].data_type()), Some(pair[1].data_type()))
                    }
                    _ => (None, None),
                },
                _ => (None, None),
            };
            QueryValue::Map(
                entries
                    .iter()
                    .map(|(key, value)| {
                        (
                            convert(key.clone(), key_type),
                            convert(value.clone(), value_type),
                        )
                    })
                    .collect(),
            )
        }
        // The member's own type is not in the Arrow union here; its value is enough.
        Value::Union(member) => convert(*member, None),
        // `Value` is non-exhaustive: a type a newer duckdb adds still prints.
        other => QueryValue::Text(format!("{other:?}")),
    }
}

fn timestamp(unit: TimeUnit, time: i64) -> Option<DateTime<Utc>> {
    match unit {
        TimeUnit::Second => DateTime::from_timestamp(time, 0),
        TimeUnit::Millisecond => DateTime::from_timestamp_millis(time),
        TimeUnit::Microsecond => DateTime::from_timestamp_micros(time),
        TimeUnit::Nanosecond => Some(DateTime::from_timestamp_nanos(time)),
    }
}
