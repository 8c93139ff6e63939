// The Python extension module safeshape._C: loading it loads libsafeshape_ops, which registers
// torch.ops.safeshape.*; the module itself only reports what the library was built against.
#include <pybind11/pybind11.h>

#include "safeshape/ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "safeshape native extension: registers torch.ops.safeshape.*";
  m.def("build_info", []() {
    const safeshape::BuildInfo b = safeshape::build_info();
    py::dict info;
    info["torch_version"] = b.torch_version;
    info["cuda"] = b.cuda;
    info["cuda_version"] = b.cuda ? py::object(py::str(b.cuda_version)) : py::object(py::none());
    info["cuda_archs"] = b.cuda_archs;
    info["cpu_isa"] = b.cpu_isa;
    return info;
  }, "What this build was compiled against: torch version, CUDA on/off, CUDA version and arch list, CPU code path.");
  m.def("cpu_fma_rate", [](double seconds) {
    const safeshape::FmaRate r = safeshape::cpu_fma_rate(seconds);
    py::dict out;
    out["float64"] = r.float64;
    out["float32"] = r.float32;
    return out;
  }, py::arg("seconds") = 0.02,
     "FMAs per second (lanes counted) of one thread of the projection kernels' CPU code path, on registers: the "
     "compute bound bench/bench_projection.py prints.");
}
