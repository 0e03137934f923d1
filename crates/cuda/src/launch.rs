//! Kernel launches through `cuLaunchKernelEx`, optionally as programmatic dependent launches
//! (PDL, sm_90 and later).
//!
//! A decode step is ~150 small kernels in a row, each reading a few MB of weights. Launched
//! normally (even from a CUDA graph) a kernel starts only once the previous one has fully drained,
//! so every boundary costs a launch plus a ramp with the memory system idle. With PDL the next
//! kernel is launched while the previous one still runs: its blocks issue their weight loads
//! (weights never depend on an earlier kernel) and then wait (`pdl_wait()` in `common.cuh`,
//! `griddepcontrol.wait`) until the previous grid has completed and its writes are visible.
//! The contract every kernel keeps: nothing written by an earlier kernel is read, and nothing is
//! written, before `pdl_wait()`. Since each kernel waits for the one before it, completion is
//! transitive: a kernel that passed its wait sees the writes of every kernel launched earlier.
use std::ffi::c_void;

use crate::pool::Pooled;

use cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig,
};

/// One kernel launch being assembled: its arguments, each held in an 8-byte slot (the driver
/// copies each parameter's own size from the start of its slot; scalars sit in the low bytes).
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    args: Vec<u64>,
    /// Tensor-map parameters (TMA descriptors, 128 bytes each) and the parameter index of each.
    tensor_maps: Vec<(usize, Box<sys::CUtensorMap>)>,
    pdl: bool,
    /// The thread-block cluster's shape (sm_90), if any.
    cluster: Option<(u32, u32, u32)>,
}

impl<'a> Launch<'a> {
    /// A launch of `func` on `stream`; `pdl` lets it start before the previous kernel ends.
    pub(crate) fn new(stream: &'a CudaStream, func: &'a CudaFunction, pdl: bool) -> Self {
        Launch {
            stream,
            func,
            args: Vec::with_capacity(24),
            tensor_maps: Vec::new(),
            pdl,
            cluster: None,
        }
    }

    /// Launches the grid as thread-block clusters of `x` × `y` × `z` consecutive blocks (sm_90;
    /// each must divide the grid's).
    pub(crate) fn cluster(&mut self, x: u32, y: u32, z: u32) -> &mut Self {
        self.cluster = Some((x, y, z));
        self
    }

    /// A device buffer, passed as its address.
    pub(crate) fn buf<T>(&mut self, s: &CudaSlice<T>) -> &mut Self {
        let (ptr, _sync) = s.device_ptr(self.stream);
        self.args.push(ptr);
        self
    }

    /// A pooled f32 buffer (typically the kernel's output), passed as its address.
    pub(crate) fn out(&mut self, p: &Pooled) -> &mut Self {
        self.buf(p.slice())
    }

    /// A device address taken elsewhere (a tensor of either element type).
    pub(crate) fn ptr(&mut self, ptr: u64) -> &mut Self {
        self.args.push(ptr);
        self
    }

    /// A tensor map (TMA descriptor), passed by value (a `__grid_constant__` parameter).
    pub(crate) fn tensor_map(&mut self, map: sys::CUtensorMap) -> &mut Self {
        self.tensor_maps
            .push((self.args.len() + self.tensor_maps.len(), Box::new(map)));
        self
    }

    /// A `size_t` parameter.
    pub(crate) fn usize(&mut self, v: usize) -> &mut Self {
        self.args.push(v as u64);
        self
    }

    pub(crate) fn i32(&mut self, v: i32) -> &mut Self {
        self.args.push(u64::from(v as u32));
        self
    }

    pub(crate) fn f32(&mut self, v: f32) -> &mut Self {
        self.args.push(u64::from(v.to_bits()));
        self
    }

    pub(crate) fn f64(&mut self, v: f64) -> &mut Self {
        self.args.push(v.to_bits());
        self
    }

    /// Submits the kernel.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, every buffer
    /// must hold what the kernel reads or writes for `cfg`, and a kernel launched with PDL must
    /// keep the contract in the module documentation.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        let mut params: Vec<*mut c_void> = self
            .args
            .iter_mut()
            .map(|a| (a as *mut u64).cast::<c_void>())
            .collect();
        for (index, map) in &mut self.tensor_maps {
            params.insert(
                *index,
                (&mut **map as *mut sys::CUtensorMap).cast::<c_void>(),
            );
        }
        let mut attrs = Vec::with_capacity(2);
        if self.pdl {
            // SAFETY: an all-zero attribute value is a valid (empty) union; the field set below
            // is the one the attribute id names.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            attrs.push(attr);
        }
        if let Some((x, y, z)) = self.cluster {
            // SAFETY: as above; clusterDim is the field CLUSTER_DIMENSION names.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attr.value.clusterDim.x = x;
            attr.value.clusterDim.y = y;
            attr.value.clusterDim.z = z;
            attrs.push(attr);
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if attrs.is_empty() {
                std::ptr::null_mut()
            } else {
                attrs.as_mut_ptr()
            },
            numAttrs: attrs.len() as u32,
        };
        self.stream.context().bind_to_thread()?;
        // SAFETY: config, the function and the parameter slots outlive the call (the driver
        // copies parameters at launch); the caller vouches for the parameters' meaning.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}
