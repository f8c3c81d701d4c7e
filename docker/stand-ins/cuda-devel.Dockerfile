# Stand-in for nvidia/cuda:13.0.x-devel where no registry is reachable: CUDA 13.0 from NVIDIA's PyPI wheels
# laid out as the real image lays it out (/usr/local/cuda/{bin,include,lib64,lib64/stubs}). It has no
# driver, so libcuda.so is a link-time stub with the driver API's names (cuda.h plus those cudarc binds).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       ca-certificates curl gcc g++ libc6-dev make pkg-config python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY certs/ /tmp/extra-certs/
# 13.0 exactly: nvcc 13.1+ emits PTX that R580 drivers cannot load.
RUN set -e; cp /etc/ssl/certs/ca-certificates.crt /tmp/bundle.crt; \
    for c in /tmp/extra-certs/*.crt; do [ -f "$c" ] && cat "$c" >> /tmp/bundle.crt; done; \
    mkdir -p /opt/cuda-wheels/whl; \
    python3 -m pip download -q --cert /tmp/bundle.crt --no-deps --only-binary=:all: -d /opt/cuda-wheels/whl \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
      nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88; \
    for w in /opt/cuda-wheels/whl/*.whl; do python3 -m zipfile -e "$w" /opt/cuda-wheels; done; \
    rm -rf /opt/cuda-wheels/whl /tmp/bundle.crt /tmp/extra-certs; \
    chmod +x /opt/cuda-wheels/nvidia/cu13/bin/* /opt/cuda-wheels/nvidia/cu13/nvvm/bin/*; \
    ln -s /opt/cuda-wheels/nvidia/cu13 /usr/local/cuda; ln -s lib /usr/local/cuda/lib64
COPY cudarc-driver-symbols.txt /tmp/
RUN set -e; cd /usr/local/cuda/lib; mkdir -p stubs; \
    for l in cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done; \
    ln -sf libcurand.so.10 libcurand.so; ln -sf libcudart.so.13 libcudart.so; \
    { grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\(' ../include/cuda.h | tr -d '('; \
      grep -oE '#define (cu[A-Za-z0-9_]+) +(cu[A-Za-z0-9_]+)' ../include/cuda.h | awk '{print $3}'; \
      cat /tmp/cudarc-driver-symbols.txt; } | sort -u | sed 's/.*/void &(void){}/' > stubs/libcuda_stub.c; \
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/libcuda_stub.c; \
    echo /usr/local/cuda/lib64 > /etc/ld.so.conf.d/cuda.conf; ldconfig; rm /tmp/cudarc-driver-symbols.txt
ENV CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
