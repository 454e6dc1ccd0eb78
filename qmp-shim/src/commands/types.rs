//! The QAPI types of the commands ferry-qemu implements (a subset of QEMU
//! 7.2's, same member names, so libvirt's schema queries find them).

use crate::qmp::schema::{opt, req, EnumDef, EventDef, Member, ObjectDef, Ty};

pub static RUN_STATE: EnumDef = EnumDef {
    name: "RunState",
    values: &[
        "debug",
        "inmigrate",
        "internal-error",
        "io-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "finish-migrate",
        "restore-vm",
        "running",
        "save-vm",
        "shutdown",
        "suspended",
        "watchdog",
        "guest-panicked",
        "colo",
    ],
};

pub static MIGRATION_STATUS: EnumDef = EnumDef {
    name: "MigrationStatus",
    values: &[
        "none",
        "setup",
        "cancelling",
        "cancelled",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "completed",
        "failed",
        "colo",
        "pre-switchover",
        "device",
        "wait-unplug",
    ],
};

/// The migration capabilities ferry honours (and reports).
pub static MIGRATION_CAPABILITY: EnumDef = EnumDef {
    name: "MigrationCapability",
    values: &[
        "events",
        "pause-before-switchover",
        "return-path",
        "late-block-activate",
        "multifd",
        "auto-converge",
        "postcopy-ram",
    ],
};

pub static SHUTDOWN_CAUSE: EnumDef = EnumDef {
    name: "ShutdownCause",
    values: &[
        "none",
        "host-error",
        "host-qmp-quit",
        "host-qmp-system-reset",
        "host-signal",
        "host-ui",
        "guest-shutdown",
        "guest-reset",
        "guest-panic",
        "subsystem-reset",
        "snapshot-load",
    ],
};

/// Which end of a connection TLS credentials are for.
pub static TLS_CREDS_ENDPOINT: EnumDef = EnumDef {
    name: "QCryptoTLSCredsEndpoint",
    values: &["client", "server"],
};

pub static QMP_CAPABILITY: EnumDef = EnumDef {
    name: "QMPCapability",
    values: &["oob"],
};

pub static CLI_PARAM_TYPE: EnumDef = EnumDef {
    name: "CommandLineParameterType",
    values: &["string", "boolean", "number", "size"],
};

pub static VERSION_TRIPLE: ObjectDef = ObjectDef {
    name: "VersionTriple",
    members: &[
        req("major", Ty::Int),
        req("minor", Ty::Int),
        req("micro", Ty::Int),
    ],
};

pub static VERSION_INFO: ObjectDef = ObjectDef {
    name: "VersionInfo",
    members: &[
        req("qemu", Ty::Object(&VERSION_TRIPLE)),
        req("package", Ty::Str),
    ],
};

pub static COMMAND_INFO: ObjectDef = ObjectDef {
    name: "CommandInfo",
    members: &[req("name", Ty::Str)],
};

pub static TARGET_INFO: ObjectDef = ObjectDef {
    name: "TargetInfo",
    members: &[req("arch", Ty::Str)],
};

pub static KVM_INFO: ObjectDef = ObjectDef {
    name: "KvmInfo",
    members: &[req("enabled", Ty::Bool), req("present", Ty::Bool)],
};

pub static STATUS_INFO: ObjectDef = ObjectDef {
    name: "StatusInfo",
    members: &[
        req("running", Ty::Bool),
        req("singlestep", Ty::Bool),
        req("status", Ty::Enum(&RUN_STATE)),
    ],
};

pub static NAME_INFO: ObjectDef = ObjectDef {
    name: "NameInfo",
    members: &[opt("name", Ty::Str)],
};

pub static UUID_INFO: ObjectDef = ObjectDef {
    name: "UuidInfo",
    members: &[req("UUID", Ty::Str)],
};

pub static OBJECT_TYPE_INFO: ObjectDef = ObjectDef {
    name: "ObjectTypeInfo",
    members: &[
        req("name", Ty::Str),
        opt("abstract", Ty::Bool),
        opt("parent", Ty::Str),
    ],
};

pub static OBJECT_PROPERTY_INFO: ObjectDef = ObjectDef {
    name: "ObjectPropertyInfo",
    members: &[
        req("name", Ty::Str),
        req("type", Ty::Str),
        opt("description", Ty::Str),
        opt("default-value", Ty::Any),
    ],
};

pub static MACHINE_INFO: ObjectDef = ObjectDef {
    name: "MachineInfo",
    members: &[
        req("name", Ty::Str),
        opt("alias", Ty::Str),
        opt("is-default", Ty::Bool),
        req("cpu-max", Ty::Int),
        req("hotpluggable-cpus", Ty::Bool),
        req("numa-mem-supported", Ty::Bool),
        req("deprecated", Ty::Bool),
        opt("default-cpu-type", Ty::Str),
        opt("default-ram-id", Ty::Str),
    ],
};

pub static CLI_PARAM_INFO: ObjectDef = ObjectDef {
    name: "CommandLineParameterInfo",
    members: &[
        req("name", Ty::Str),
        req("type", Ty::Enum(&CLI_PARAM_TYPE)),
        opt("help", Ty::Str),
        opt("default", Ty::Str),
    ],
};

pub static CLI_OPTION_INFO: ObjectDef = ObjectDef {
    name: "CommandLineOptionInfo",
    members: &[
        req("option", Ty::Str),
        req("parameters", Ty::Array(&Ty::Object(&CLI_PARAM_INFO))),
    ],
};

pub static MIGRATION_CAPABILITY_STATUS: ObjectDef = ObjectDef {
    name: "MigrationCapabilityStatus",
    members: &[
        req("capability", Ty::Enum(&MIGRATION_CAPABILITY)),
        req("state", Ty::Bool),
    ],
};

/// Parameters ferry honours; TLS ones accept only "" (TLS off).
pub static MIGRATION_PARAMETERS_MEMBERS: &[Member] = &[
    opt("max-bandwidth", Ty::Int),
    opt("downtime-limit", Ty::Int),
    opt("multifd-channels", Ty::Int),
    opt("cpu-throttle-initial", Ty::Int),
    opt("cpu-throttle-increment", Ty::Int),
    opt("cpu-throttle-tailslow", Ty::Bool),
    opt("max-cpu-throttle", Ty::Int),
    opt("throttle-trigger-threshold", Ty::Int),
    opt("announce-initial", Ty::Int),
    opt("announce-max", Ty::Int),
    opt("announce-rounds", Ty::Int),
    opt("announce-step", Ty::Int),
    opt("multifd-compression", Ty::Enum(&MULTIFD_COMPRESSION)),
    opt("multifd-zlib-level", Ty::Int),
    opt("multifd-zstd-level", Ty::Int),
    opt("max-postcopy-bandwidth", Ty::Int),
    opt("tls-creds", Ty::Str),
    opt("tls-hostname", Ty::Str),
    opt("tls-authz", Ty::Str),
];

/// QEMU 7.2's MultiFDCompression (zstd where QEMU was built with it, as
/// Debian's is); ferry takes `none` only (see `migrate-set-parameters`).
pub static MULTIFD_COMPRESSION: EnumDef = EnumDef {
    name: "MultiFDCompression",
    values: &["none", "zlib", "zstd"],
};

pub static MIGRATION_PARAMETERS: ObjectDef = ObjectDef {
    name: "MigrationParameters",
    members: MIGRATION_PARAMETERS_MEMBERS,
};

pub static MIGRATION_STATS: ObjectDef = ObjectDef {
    name: "MigrationStats",
    members: &[
        req("transferred", Ty::Int),
        req("remaining", Ty::Int),
        req("total", Ty::Int),
        req("duplicate", Ty::Int),
        req("skipped", Ty::Int),
        req("normal", Ty::Int),
        req("normal-bytes", Ty::Int),
        req("dirty-pages-rate", Ty::Int),
        req("mbps", Ty::Number),
        req("dirty-sync-count", Ty::Int),
        req("postcopy-requests", Ty::Int),
        req("page-size", Ty::Int),
        req("multifd-bytes", Ty::Int),
        req("pages-per-second", Ty::Int),
        req("precopy-bytes", Ty::Int),
        req("downtime-bytes", Ty::Int),
        req("postcopy-bytes", Ty::Int),
        req("dirty-sync-missed-zero-copy", Ty::Int),
    ],
};

pub static MIGRATION_INFO: ObjectDef = ObjectDef {
    name: "MigrationInfo",
    members: &[
        opt("status", Ty::Enum(&MIGRATION_STATUS)),
        opt("ram", Ty::Object(&MIGRATION_STATS)),
        opt("total-time", Ty::Int),
        opt("expected-downtime", Ty::Int),
        opt("downtime", Ty::Int),
        opt("setup-time", Ty::Int),
        opt("cpu-throttle-percentage", Ty::Int),
        opt("error-desc", Ty::Str),
        opt("blocked-reasons", Ty::Array(&Ty::Str)),
        opt("x-switchover-returns", Ty::Int),
    ],
};

pub static CHARDEV_INFO: ObjectDef = ObjectDef {
    name: "ChardevInfo",
    members: &[
        req("label", Ty::Str),
        req("filename", Ty::Str),
        req("frontend-open", Ty::Bool),
    ],
};

pub static FDSET_FD_INFO: ObjectDef = ObjectDef {
    name: "FdsetFdInfo",
    members: &[req("fd", Ty::Int), opt("opaque", Ty::Str)],
};

pub static FDSET_INFO: ObjectDef = ObjectDef {
    name: "FdsetInfo",
    members: &[
        req("fdset-id", Ty::Int),
        req("fds", Ty::Array(&Ty::Object(&FDSET_FD_INFO))),
    ],
};

pub static ADDFD_INFO: ObjectDef = ObjectDef {
    name: "AddfdInfo",
    members: &[req("fdset-id", Ty::Int), req("fd", Ty::Int)],
};

/// Events ferry-qemu emits.
pub static EVENTS: &[EventDef] = &[
    EventDef {
        name: "SHUTDOWN",
        data: &[
            req("guest", Ty::Bool),
            req("reason", Ty::Enum(&SHUTDOWN_CAUSE)),
        ],
    },
    EventDef {
        name: "POWERDOWN",
        data: &[],
    },
    EventDef {
        name: "RESET",
        data: &[
            req("guest", Ty::Bool),
            req("reason", Ty::Enum(&SHUTDOWN_CAUSE)),
        ],
    },
    EventDef {
        name: "STOP",
        data: &[],
    },
    EventDef {
        name: "RESUME",
        data: &[],
    },
    EventDef {
        name: "MIGRATION",
        data: &[req("status", Ty::Enum(&MIGRATION_STATUS))],
    },
    EventDef {
        name: "BALLOON_CHANGE",
        data: &[req("actual", Ty::Int)],
    },
    EventDef {
        name: "RTC_CHANGE",
        data: &[req("offset", Ty::Int)],
    },
    EventDef {
        name: "MIGRATION_PASS",
        data: &[req("pass", Ty::Int)],
    },
];

pub static CPU_INSTANCE_PROPERTIES: ObjectDef = ObjectDef {
    name: "CpuInstanceProperties",
    members: &[
        opt("node-id", Ty::Int),
        opt("socket-id", Ty::Int),
        opt("die-id", Ty::Int),
        opt("cluster-id", Ty::Int),
        opt("core-id", Ty::Int),
        opt("thread-id", Ty::Int),
    ],
};

pub static HOTPLUGGABLE_CPU: ObjectDef = ObjectDef {
    name: "HotpluggableCPU",
    members: &[
        req("type", Ty::Str),
        req("vcpus-count", Ty::Int),
        req("props", Ty::Object(&CPU_INSTANCE_PROPERTIES)),
        opt("qom-path", Ty::Str),
    ],
};

pub static CPU_INFO_FAST: ObjectDef = ObjectDef {
    name: "CpuInfoFast",
    members: &[
        req("cpu-index", Ty::Int),
        req("qom-path", Ty::Str),
        req("thread-id", Ty::Int),
        opt("props", Ty::Object(&CPU_INSTANCE_PROPERTIES)),
        req("target", Ty::Str),
    ],
};

pub static IOTHREAD_INFO: ObjectDef = ObjectDef {
    name: "IOThreadInfo",
    members: &[req("id", Ty::Str), req("thread-id", Ty::Int)],
};

pub static BALLOON_INFO: ObjectDef = ObjectDef {
    name: "BalloonInfo",
    members: &[req("actual", Ty::Int)],
};

pub static BLOCK_INFO: ObjectDef = ObjectDef {
    name: "BlockInfo",
    members: &[
        req("device", Ty::Str),
        opt("qdev", Ty::Str),
        req("type", Ty::Str),
        req("removable", Ty::Bool),
        req("locked", Ty::Bool),
        opt("inserted", Ty::Object(&BLOCK_DEVICE_INFO)),
        opt("tray_open", Ty::Bool),
        opt("io-status", Ty::Str),
    ],
};

pub static IMAGE_INFO: ObjectDef = ObjectDef {
    name: "ImageInfo",
    members: &[
        req("filename", Ty::Str),
        req("format", Ty::Str),
        opt("dirty-flag", Ty::Bool),
        opt("actual-size", Ty::Int),
        req("virtual-size", Ty::Int),
        opt("cluster-size", Ty::Int),
        opt("backing-filename", Ty::Str),
        opt("full-backing-filename", Ty::Str),
        opt("backing-filename-format", Ty::Str),
        opt("backing-image", Ty::Object(&IMAGE_INFO)),
        opt("format-specific", Ty::Any),
    ],
};

pub static BLOCKDEV_CACHE_INFO: ObjectDef = ObjectDef {
    name: "BlockdevCacheInfo",
    members: &[
        req("writeback", Ty::Bool),
        req("direct", Ty::Bool),
        req("no-flush", Ty::Bool),
    ],
};

pub static BLOCK_DEVICE_INFO: ObjectDef = ObjectDef {
    name: "BlockDeviceInfo",
    members: &[
        req("file", Ty::Str),
        opt("node-name", Ty::Str),
        req("ro", Ty::Bool),
        req("drv", Ty::Str),
        opt("backing_file", Ty::Str),
        req("backing_file_depth", Ty::Int),
        req("encrypted", Ty::Bool),
        req("detect_zeroes", Ty::Str),
        req("bps", Ty::Int),
        req("bps_rd", Ty::Int),
        req("bps_wr", Ty::Int),
        req("iops", Ty::Int),
        req("iops_rd", Ty::Int),
        req("iops_wr", Ty::Int),
        req("image", Ty::Object(&IMAGE_INFO)),
        req("write_threshold", Ty::Int),
        req("cache", Ty::Object(&BLOCKDEV_CACHE_INFO)),
    ],
};

pub static BLOCK_DEVICE_STATS: ObjectDef = ObjectDef {
    name: "BlockDeviceStats",
    members: &[
        req("rd_bytes", Ty::Int),
        req("wr_bytes", Ty::Int),
        req("unmap_bytes", Ty::Int),
        req("rd_operations", Ty::Int),
        req("wr_operations", Ty::Int),
        req("flush_operations", Ty::Int),
        req("unmap_operations", Ty::Int),
        req("rd_total_time_ns", Ty::Int),
        req("wr_total_time_ns", Ty::Int),
        req("flush_total_time_ns", Ty::Int),
        req("unmap_total_time_ns", Ty::Int),
        req("wr_highest_offset", Ty::Int),
        req("rd_merged", Ty::Int),
        req("wr_merged", Ty::Int),
        req("unmap_merged", Ty::Int),
        req("failed_rd_operations", Ty::Int),
        req("failed_wr_operations", Ty::Int),
        req("failed_flush_operations", Ty::Int),
        req("failed_unmap_operations", Ty::Int),
        req("invalid_rd_operations", Ty::Int),
        req("invalid_wr_operations", Ty::Int),
        req("invalid_flush_operations", Ty::Int),
        req("invalid_unmap_operations", Ty::Int),
        req("account_invalid", Ty::Bool),
        req("account_failed", Ty::Bool),
    ],
};

pub static BLOCK_STATS: ObjectDef = ObjectDef {
    name: "BlockStats",
    members: &[
        opt("device", Ty::Str),
        opt("qdev", Ty::Str),
        opt("node-name", Ty::Str),
        req("stats", Ty::Object(&BLOCK_DEVICE_STATS)),
        opt("parent", Ty::Object(&BLOCK_STATS)),
        opt("backing", Ty::Object(&BLOCK_STATS)),
    ],
};

pub static JOB_INFO: ObjectDef = ObjectDef {
    name: "JobInfo",
    members: &[
        req("id", Ty::Str),
        req("type", Ty::Str),
        req("status", Ty::Str),
    ],
};
