//! `src/schema.rs` is written by hand; this keeps it equal to what the migrations build. A
//! fresh database is migrated, and its catalogue (`information_schema`: tables, columns, their
//! types and nullability, primary keys, foreign keys) compared with the `table!` and
//! `joinable!` declarations of schema.rs. A column a migration adds without schema.rs (or the
//! other way round), a wrong type or a wrong `Nullable` fails here, naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use diesel::RunQueryDsl;
use diesel::sql_types::Text;
use volley_db::testing::TestDatabase;

const SCHEMA_RS: &str = include_str!("../src/schema.rs");

/// One column: its PostgreSQL type (`udt_name`: `int8`, `_text` for `text[]`) and whether it
/// may be NULL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Column {
    udt: String,
    nullable: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Table {
    primary_key: Vec<String>,
    columns: BTreeMap<String, Column>,
}

/// A diesel SQL type as PostgreSQL names it; `None` for a type this check does not know yet.
fn udt_of(diesel: &str) -> Option<String> {
    if let Some(inner) = diesel
        .strip_prefix("Array<")
        .and_then(|t| t.strip_suffix('>'))
    {
        return udt_of(inner).map(|u| format!("_{u}"));
    }
    let udt = match diesel {
        "Int2" | "SmallInt" => "int2",
        "Int4" | "Integer" => "int4",
        "Int8" | "BigInt" => "int8",
        "Float4" => "float4",
        "Float8" | "Double" => "float8",
        "Numeric" => "numeric",
        "Text" => "text",
        "Varchar" | "VarChar" => "varchar",
        "Bool" => "bool",
        "Bytea" | "Binary" => "bytea",
        "Timestamptz" => "timestamptz",
        "Timestamp" => "timestamp",
        "Date" => "date",
        "Interval" => "interval",
        "Jsonb" => "jsonb",
        "Json" => "json",
        "Uuid" => "uuid",
        _ => return None,
    };
    Some(udt.to_owned())
}

/// Tables by name.
type Tables = BTreeMap<String, Table>;
/// Single-column foreign keys (and `joinable!` lines) as (child, parent, column).
type Joins = BTreeSet<(String, String, String)>;

/// The tables schema.rs declares, and its `joinable!` lines.
fn declared() -> (Tables, Joins) {
    let mut tables = BTreeMap::new();
    let mut joins = BTreeSet::new();
    let mut current: Option<(String, Table)> = None;
    for (n, raw) in SCHEMA_RS.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with("//") || line.starts_with("#[") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("diesel::joinable!(") {
            // `jobs -> batches (batch_id));`
            let rest = rest.trim_end_matches(';').trim_end_matches(')');
            let (child, rest) = rest.split_once("->").expect("joinable child");
            let (parent, col) = rest.trim().split_once('(').expect("joinable column");
            joins.insert((
                child.trim().to_owned(),
                parent.trim().to_owned(),
                col.trim_end_matches(')').trim().to_owned(),
            ));
            continue;
        }
        match &mut current {
            None => {
                // `jobs (id) {`, the line after `diesel::table! {`.
                if let Some(head) = line.strip_suffix('{')
                    && let Some((name, pk)) = head.trim().split_once('(')
                    && !name.contains('!')
                {
                    let pk = pk.trim().trim_end_matches(')');
                    let table = Table {
                        primary_key: pk.split(',').map(|c| c.trim().to_owned()).collect(),
                        columns: BTreeMap::new(),
                    };
                    current = Some((name.trim().to_owned(), table));
                }
            }
            Some((name, table)) => {
                if line == "}" {
                    let (name, table) = (name.clone(), std::mem::take(table));
                    tables.insert(name, table);
                    current = None;
                    continue;
                }
                let (col, ty) = line
                    .trim_end_matches(',')
                    .split_once("->")
                    .unwrap_or_else(|| panic!("schema.rs:{}: not a column: {raw}", n + 1));
                let ty = ty.trim();
                let (nullable, ty) = match ty
                    .strip_prefix("Nullable<")
                    .and_then(|t| t.strip_suffix('>'))
                {
                    Some(inner) => (true, inner),
                    None => (false, ty),
                };
                let udt = udt_of(ty).unwrap_or_else(|| {
                    panic!(
                        "schema.rs:{}: type {ty} unknown to this check; add it",
                        n + 1
                    )
                });
                table
                    .columns
                    .insert(col.trim().to_owned(), Column { udt, nullable });
            }
        }
    }
    assert!(current.is_none(), "schema.rs: a table! block never closed");
    (tables, joins)
}

#[derive(diesel::QueryableByName)]
struct DbColumn {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = Text)]
    udt_name: String,
    #[diesel(sql_type = Text)]
    is_nullable: String,
}

#[derive(diesel::QueryableByName)]
struct DbKey {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
}

#[derive(diesel::QueryableByName)]
struct DbForeignKey {
    #[diesel(sql_type = Text)]
    child: String,
    #[diesel(sql_type = Text)]
    parent: String,
    #[diesel(sql_type = Text)]
    column_name: String,
}

/// The migrated database's tables and foreign keys (child, parent, column).
async fn migrated() -> (Tables, Joins) {
    let (_t, db) = TestDatabase::create().await.unwrap();
    db.run(|conn| {
        let columns: Vec<DbColumn> = diesel::sql_query(
            "SELECT table_name::text, column_name::text, udt_name::text, is_nullable::text \
             FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations'",
        )
        .load(&mut **conn)?;
        let keys: Vec<DbKey> = diesel::sql_query(
            "SELECT k.table_name::text, k.column_name::text \
             FROM information_schema.table_constraints c \
             JOIN information_schema.key_column_usage k \
               ON k.constraint_schema = c.constraint_schema \
              AND k.constraint_name = c.constraint_name \
             WHERE c.table_schema = 'public' AND c.constraint_type = 'PRIMARY KEY' \
               AND c.table_name <> '__diesel_schema_migrations' \
             ORDER BY k.table_name, k.ordinal_position",
        )
        .load(&mut **conn)?;
        let foreign: Vec<DbForeignKey> = diesel::sql_query(
            "SELECT cl.relname::text AS child, pa.relname::text AS parent, \
                    a.attname::text AS column_name \
             FROM pg_constraint f \
             JOIN pg_class cl ON cl.oid = f.conrelid \
             JOIN pg_class pa ON pa.oid = f.confrelid \
             JOIN pg_namespace n ON n.oid = cl.relnamespace \
             JOIN pg_attribute a ON a.attrelid = f.conrelid AND a.attnum = ANY(f.conkey) \
             WHERE f.contype = 'f' AND n.nspname = 'public' AND cardinality(f.conkey) = 1",
        )
        .load(&mut **conn)?;
        let mut tables = Tables::new();
        for c in columns {
            tables.entry(c.table_name).or_default().columns.insert(
                c.column_name,
                Column {
                    udt: c.udt_name,
                    nullable: c.is_nullable == "YES",
                },
            );
        }
        for k in keys {
            tables
                .entry(k.table_name)
                .or_default()
                .primary_key
                .push(k.column_name);
        }
        let foreign = foreign
            .into_iter()
            .map(|f| (f.child, f.parent, f.column_name))
            .collect();
        Ok((tables, foreign))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn schema_rs_matches_the_migrated_database() {
    let (want, joins) = declared();
    let (have, foreign) = migrated().await;
    assert!(want.contains_key("jobs") && have.contains_key("jobs"));
    let mut problems = Vec::new();
    for name in want.keys().chain(have.keys()).collect::<BTreeSet<_>>() {
        let (Some(w), Some(h)) = (want.get(name), have.get(name)) else {
            problems.push(match want.contains_key(name) {
                true => format!("table {name}: in schema.rs, not in the migrations"),
                false => format!("table {name}: in the migrations, not in schema.rs"),
            });
            continue;
        };
        if w.primary_key != h.primary_key {
            problems.push(format!(
                "table {name}: primary key {:?} in schema.rs, {:?} in the database",
                w.primary_key, h.primary_key
            ));
        }
        for col in w
            .columns
            .keys()
            .chain(h.columns.keys())
            .collect::<BTreeSet<_>>()
        {
            match (w.columns.get(col), h.columns.get(col)) {
                (Some(a), Some(b)) if a != b => problems.push(format!(
                    "{name}.{col}: schema.rs says {a:?}, the database {b:?}"
                )),
                (Some(_), None) => {
                    problems.push(format!("{name}.{col}: in schema.rs, not in the database"))
                }
                (None, Some(_)) => {
                    problems.push(format!("{name}.{col}: in the database, not in schema.rs"))
                }
                _ => {}
            }
        }
    }
    // Every `joinable!` stands on a real foreign key.
    for j in &joins {
        if !foreign.contains(j) {
            problems.push(format!(
                "joinable!({} -> {} ({})): no such foreign key in the database",
                j.0, j.1, j.2
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "schema.rs differs from the migrations:\n{}",
        problems.join("\n")
    );
}

/// The parser reads what it should: a check that parses nothing would pass anything.
#[test]
fn the_declarations_are_read() {
    let (tables, joins) = declared();
    let jobs = &tables["jobs"];
    assert_eq!(jobs.primary_key, ["id"]);
    assert_eq!(
        jobs.columns["media_keys"],
        Column {
            udt: "_text".into(),
            nullable: true
        }
    );
    assert_eq!(
        jobs.columns["status"],
        Column {
            udt: "text".into(),
            nullable: false
        }
    );
    assert_eq!(
        tables["idempotency_keys"].primary_key,
        ["api_key_id", "idempotency_key"]
    );
    assert!(joins.contains(&("jobs".into(), "batches".into(), "batch_id".into())));
}
