//! GPUs through NVML, loaded at run time: on a machine without the NVIDIA driver the
//! library is simply absent and there are no GPUs (the binary still runs).

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, PcieUtilCounter, TemperatureSensor};

/// A GPU found at start.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    /// NVML index (what `CUDA_VISIBLE_DEVICES` and device requests name).
    pub index: u32,
    pub uuid: String,
    /// Model, e.g. `NVIDIA H200`.
    pub name: String,
    pub memory_bytes: u64,
}

/// One reading of one GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub utilization_percent: Option<f64>,
    pub memory_utilization_percent: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watt: Option<f64>,
    pub power_limit_watt: Option<f64>,
    pub clock_sm_mhz: Option<f64>,
    pub clock_mem_mhz: Option<f64>,
    pub pcie_rx_bytes_per_sec: Option<f64>,
    pub pcie_tx_bytes_per_sec: Option<f64>,
}

/// NVML, when the driver is there.
pub struct Gpus {
    nvml: Option<Nvml>,
}

impl Gpus {
    /// Loads NVML; without it, a handle that knows no GPU.
    pub fn load() -> Gpus {
        match Nvml::init() {
            Ok(n) => Gpus { nvml: Some(n) },
            Err(e) => {
                tracing::debug!(error = %e, "NVML not available: no GPUs on this worker");
                Gpus { nvml: None }
            }
        }
    }

    /// The GPUs of this machine.
    pub fn discover(&self) -> Vec<GpuInfo> {
        let Some(n) = &self.nvml else { return vec![] };
        let count = n.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let d = n.device_by_index(i).ok()?;
                Some(GpuInfo {
                    index: i,
                    uuid: d.uuid().unwrap_or_default(),
                    name: d.name().unwrap_or_else(|_| "GPU".into()),
                    memory_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Reads the GPUs of these indexes (each field that the GPU reports).
    pub fn read(&self, indexes: &[u32]) -> Vec<GpuReading> {
        let Some(n) = &self.nvml else { return vec![] };
        indexes
            .iter()
            .filter_map(|i| {
                let d = n.device_by_index(*i).ok()?;
                let util = d.utilization_rates().ok();
                let mem = d.memory_info().ok();
                Some(GpuReading {
                    index: *i,
                    utilization_percent: util.as_ref().map(|u| u.gpu as f64),
                    memory_utilization_percent: mem
                        .as_ref()
                        .filter(|m| m.total > 0)
                        .map(|m| m.used as f64 * 100.0 / m.total as f64),
                    memory_used_bytes: mem.as_ref().map(|m| m.used as f64),
                    temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
                    power_watt: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
                    power_limit_watt: d.enforced_power_limit().ok().map(|mw| mw as f64 / 1000.0),
                    clock_sm_mhz: d.clock_info(Clock::SM).ok().map(f64::from),
                    clock_mem_mhz: d.clock_info(Clock::Memory).ok().map(f64::from),
                    pcie_rx_bytes_per_sec: d
                        .pcie_throughput(PcieUtilCounter::Receive)
                        .ok()
                        .map(|kb| kb as f64 * 1024.0),
                    pcie_tx_bytes_per_sec: d
                        .pcie_throughput(PcieUtilCounter::Send)
                        .ok()
                        .map(|kb| kb as f64 * 1024.0),
                })
            })
            .collect()
    }
}

/// The hardware profile name of a GPU model: `NVIDIA H200` → `gpu.h200`,
/// `NVIDIA A100-SXM4-80GB` → `gpu.a100`.
pub fn profile_name(model: &str) -> String {
    let m = model.to_ascii_lowercase();
    let m = m.trim_start_matches("nvidia").trim();
    let m = m
        .trim_start_matches("geforce")
        .trim()
        .trim_start_matches("tesla")
        .trim();
    let first = m
        .split(|c: char| c.is_whitespace() || c == '-')
        .find(|w| !w.is_empty())
        .unwrap_or("gpu");
    let clean: String = first
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!("gpu.{clean}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names() {
        assert_eq!(profile_name("NVIDIA H200"), "gpu.h200");
        assert_eq!(profile_name("NVIDIA A100-SXM4-80GB"), "gpu.a100");
        assert_eq!(profile_name("Tesla T4"), "gpu.t4");
        assert_eq!(profile_name("NVIDIA L40S"), "gpu.l40s");
    }

    #[test]
    fn without_a_driver_there_are_no_gpus() {
        if std::path::Path::new("/dev/nvidiactl").exists() {
            return;
        }
        let g = Gpus::load();
        assert!(g.discover().is_empty());
        assert!(g.read(&[0]).is_empty());
    }
}
