//! Arbitrary SQL for `pm-query`: one statement run on a read-only connection, its rows handed
//! over one at a time as [`QueryValue`]s so that no module but `inventory` sees DuckDB's types.

use std::ops::ControlFlow;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use duckdb::arrow::datatypes::DataType;
use duckdb::types::{TimeUnit, Value};

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

impl Inventory {
    /// Runs one SQL statement from a person (`pm-query`) and hands its rows to `sink`. The
    /// connection must be read-only ([`Inventory::open_read_only`]); file system access is also
    /// switched off first, so `COPY ... TO` or `ATTACH` cannot write anywhere either.
    pub fn query(&self, sql: &str, sink: &mut dyn QuerySink) -> Result<QueryResult, QueryError> {
        self.conn
            // UTC so that casts and strftime in the SQL agree with the UTC the rows print in.
            .execute_batch("SET enable_external_access = false; SET TimeZone = 'UTC'")
            .map_err(QueryError::from_duckdb)?;
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
