//! Test-only values the decisions' tests share: a time, a dataset shape, MiB.

use crate::estimate::DatasetShape;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// The time `secs` seconds after the epoch.
pub fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

/// 5,000 JPEG photos of up to `w`x`h`.
pub fn shape(w: u32, h: u32) -> DatasetShape {
    DatasetShape {
        images: 5_000,
        bytes: 10_000_000_000,
        max_width: w,
        max_height: h,
        max_is_jpeg: true,
    }
}
