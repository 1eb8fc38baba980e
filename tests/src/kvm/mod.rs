//! The real-KVM harness (issue 5): a guest under /dev/kvm gets its certificate table through
//! a running `coco-sidecar`. See docs/kvm-harness.md.
//!
//! - [`guest`]: the guest program (assembled at test time) and its port/register ABI;
//! - [`record`]: the two kernel exit records, laid out by hand;
//! - [`vmm`]: the minimal VMM: memfd RAM shared with KVM and the sidecar, vCPU threads, the
//!   kernel stand-in for the SNP exit, and the production exit path with `immediate_exit`;
//! - [`blob`]: certificate tables built and walked by hand, for independent expectations.

pub mod blob;
pub mod guest;
pub mod record;
pub mod vmm;

/// Set to `1` to turn a missing or unusable /dev/kvm into a failure instead of a skip (for CI
/// on machines that have KVM).
pub const REQUIRE_KVM_VAR: &str = "COCO_REQUIRE_KVM";

/// /dev/kvm, ready for the harness; or `None` after printing one `SKIPPED:` line for `test`
/// to stderr (written to the real stderr, so the test harness's capture does not hide it).
/// Panics instead of skipping when [`REQUIRE_KVM_VAR`] is `1`.
pub fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match vmm::open_kvm() {
        Ok(kvm) => Some(kvm),
        Err(reason) => {
            let why = format!("/dev/kvm not available: {reason}");
            coco_tests::skip_unless_required(REQUIRE_KVM_VAR, test, &why);
            None
        }
    }
}
