//! In-place tensor access: a received f32 payload as `&[f32]` or a nalgebra view over the
//! receive buffer, with no per-element decode and no copy.

use nalgebra::DVectorView;
use rkyv::vec::ArchivedVec;
use zerocopy::{FromBytes, IntoBytes};

/// Little-endian f32s inside a validated archive.
pub trait TensorView {
    /// The values as native f32s, borrowed from the receive buffer.
    fn as_f32s(&self) -> &[f32];

    /// The values as a nalgebra column vector view (no copy).
    fn as_dvector(&self) -> DVectorView<'_, f32> {
        let s = self.as_f32s();
        DVectorView::from_slice(s, s.len())
    }
}

#[cfg(target_endian = "little")]
impl TensorView for ArchivedVec<rend::f32_le> {
    fn as_f32s(&self) -> &[f32] {
        // f32_le is a 4-aligned 4-byte LE float: on a little-endian host its bytes are an f32.
        // zerocopy checks size and alignment, so this cannot misread; the fallback is unreachable
        // because archived f32 slices are 4-aligned by construction (bytecheck verified it).
        <[f32]>::ref_from_bytes(self.as_slice().as_bytes()).unwrap_or(&[])
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("tidepool's in-place tensor path assumes a little-endian host");
