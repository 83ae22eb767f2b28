//! `gantry fleet devices add|import|export|list|show|remove`: the device registry.
//!
//! Exit codes: 0 ok, 1 error, 2 usage or invalid input (a bad import record, filter or field),
//! 4 not found (an unknown device).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use gantry_fleet::registry::{
    Delivery, Device, Filter, Format, Health, Registry, RegistryError, format_time,
};

mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const INVALID: u8 = 2;
    pub const NOT_FOUND: u8 = 4;
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// The device registry.
    #[command(subcommand)]
    Devices(DevicesCommand),
}

#[derive(Debug, Args)]
pub struct Db {
    /// The registry database (SQLite; created if missing).
    #[arg(long, value_name = "PATH", default_value = "gantry-fleet.db")]
    db: PathBuf,
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Has this tag (repeatable: all of them).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// In this group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// At this location.
    #[arg(long, value_name = "LOCATION")]
    location: Option<String>,
    /// Runs a version matching this semver requirement, e.g. ">=1.2, <2".
    #[arg(long, value_name = "REQ")]
    version: Option<String>,
    /// Seen within this long, e.g. 1h.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    seen_within: Option<std::time::Duration>,
    /// Not seen for this long (or never).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    unseen_for: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Registers one device (its id must be new).
    Add {
        #[command(flatten)]
        db: Db,
        /// Unique id.
        #[arg(long)]
        id: String,
        /// Where it is reached: host:port (http) or [user@]host[:port] (ssh).
        #[arg(long)]
        address: String,
        /// A human name [default: the id].
        #[arg(long)]
        name: Option<String>,
        /// http or ssh.
        #[arg(long, default_value = "http")]
        delivery: String,
        /// A tag (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Its group.
        #[arg(long)]
        group: Option<String>,
        /// Its location.
        #[arg(long)]
        location: Option<String>,
        /// The version it runs.
        #[arg(long)]
        version: Option<String>,
        /// Print the device as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Imports devices from a CSV or JSON file in one transaction: all, or none when a record is
    /// bad (its line is named). Existing ids are replaced.
    Import {
        #[command(flatten)]
        db: Db,
        /// The file (`-` for standard input).
        file: PathBuf,
        /// csv or json [default: by the file's extension, csv otherwise].
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Writes the devices matching the filters to standard output (the import formats).
    Export {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        filter: FilterArgs,
        /// csv or json.
        #[arg(long, value_name = "FORMAT", default_value = "csv")]
        format: String,
    },
    /// Lists devices matching the filters, in id order.
    List {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Skip this many.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows one device.
    Show {
        #[command(flatten)]
        db: Db,
        /// The device id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Removes one device.
    Remove {
        #[command(flatten)]
        db: Db,
        /// The device id.
        id: String,
    },
}

struct Failure {
    code: u8,
    message: String,
}

fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        let code = match e {
            RegistryError::Invalid(_) | RegistryError::Exists(_) => exit::INVALID,
            RegistryError::Database(_) | RegistryError::Io(_) => exit::ERROR,
        };
        failure(code, e.to_string())
    }
}

/// Runs a fleet command; returns the exit code.
pub fn run(command: FleetCommand) -> u8 {
    let FleetCommand::Devices(command) = command;
    match devices(command) {
        Ok(()) => exit::OK,
        Err(f) => {
            eprintln!("gantry fleet: {}", f.message);
            f.code
        }
    }
}

fn open(db: &Db) -> Result<Registry, Failure> {
    Ok(Registry::open(&db.db)?)
}

fn format_arg(s: &str) -> Result<Format, Failure> {
    match s {
        "csv" => Ok(Format::Csv),
        "json" => Ok(Format::Json),
        other => Err(failure(
            exit::INVALID,
            format!("format {other:?} is not csv or json"),
        )),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn filter(args: FilterArgs) -> Result<Filter, Failure> {
    let ago = |d: std::time::Duration| now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    Ok(Filter {
        tags: args.tags,
        group: args.group,
        location: args.location,
        version: args
            .version
            .map(|v| {
                semver::VersionReq::parse(&v)
                    .map_err(|e| failure(exit::INVALID, format!("version requirement {v:?}: {e}")))
            })
            .transpose()?,
        seen_since: args.seen_within.map(ago),
        unseen_since: args.unseen_for.map(ago),
    })
}

fn print_device(d: &Device) {
    println!("id:        {}", d.id);
    println!("name:      {}", d.name);
    println!("address:   {} ({})", d.address, d.delivery.as_str());
    println!("tags:      {}", d.tags.join(", "));
    println!("group:     {}", d.group.as_deref().unwrap_or("-"));
    println!("location:  {}", d.location.as_deref().unwrap_or("-"));
    println!("version:   {}", d.version.as_deref().unwrap_or("-"));
    println!(
        "last seen: {}",
        d.last_seen
            .map(format_time)
            .unwrap_or_else(|| "never".into())
    );
    println!("health:    {}", d.health.as_str());
}

fn json_line(v: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string(v).map_err(|e| failure(exit::ERROR, e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn devices(command: DevicesCommand) -> Result<(), Failure> {
    match command {
        DevicesCommand::Add {
            db,
            id,
            address,
            name,
            delivery,
            tags,
            group,
            location,
            version,
            json,
        } => {
            let delivery: Delivery = delivery
                .parse()
                .map_err(|e: String| failure(exit::INVALID, e))?;
            let device = Device {
                name: name.unwrap_or_else(|| id.clone()),
                id,
                address,
                delivery,
                tags,
                group,
                location,
                version,
                last_seen: None,
                health: Health::Unknown,
            };
            open(&db)?.add(&device)?;
            if json {
                json_line(&device)?;
            } else {
                println!("added device {}", device.id);
            }
        }
        DevicesCommand::Import {
            db,
            file,
            format,
            json,
        } => {
            let format = match format {
                Some(f) => format_arg(&f)?,
                None => Format::of_path(&file),
            };
            let mut registry = open(&db)?;
            let started = std::time::Instant::now();
            let n = if file == Path::new("-") {
                registry.import(std::io::stdin().lock(), format)?
            } else {
                let f = std::fs::File::open(&file).map_err(|e| {
                    failure(
                        exit::INVALID,
                        format!("cannot open {}: {e}", file.display()),
                    )
                })?;
                registry.import(std::io::BufReader::new(f), format)?
            };
            let secs = started.elapsed().as_secs_f64();
            if json {
                json_line(&serde_json::json!({ "imported": n, "seconds": secs }))?;
            } else {
                println!("imported {n} devices in {secs:.2} s");
            }
        }
        DevicesCommand::Export {
            db,
            filter: f,
            format,
        } => {
            let format = format_arg(&format)?;
            let f = filter(f)?;
            open(&db)?.export(&f, format, std::io::stdout().lock())?;
        }
        DevicesCommand::List {
            db,
            filter: f,
            limit,
            offset,
            json,
        } => {
            let f = filter(f)?;
            let (page, total) = open(&db)?.list(&f, offset, limit)?;
            if json {
                json_line(&serde_json::json!({ "devices": page, "total": total }))?;
            } else {
                println!(
                    "{:<20} {:<22} {:<6} {:<12} {:<12} {:<10} {:<9}",
                    "ID", "ADDRESS", "VIA", "GROUP", "LOCATION", "VERSION", "HEALTH"
                );
                for d in &page {
                    println!(
                        "{:<20} {:<22} {:<6} {:<12} {:<12} {:<10} {:<9}",
                        d.id,
                        d.address,
                        d.delivery.as_str(),
                        d.group.as_deref().unwrap_or("-"),
                        d.location.as_deref().unwrap_or("-"),
                        d.version.as_deref().unwrap_or("-"),
                        d.health.as_str()
                    );
                }
                println!("{} of {total} matching device(s)", page.len());
            }
        }
        DevicesCommand::Show { db, id, json } => {
            let device = open(&db)?
                .get(&id)?
                .ok_or_else(|| failure(exit::NOT_FOUND, format!("no device {id}")))?;
            if json {
                json_line(&device)?;
            } else {
                print_device(&device);
            }
        }
        DevicesCommand::Remove { db, id } => {
            if !open(&db)?.remove(&id)? {
                return Err(failure(exit::NOT_FOUND, format!("no device {id}")));
            }
            println!("removed device {id}");
        }
    }
    Ok(())
}
