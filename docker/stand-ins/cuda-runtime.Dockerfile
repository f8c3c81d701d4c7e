# Stand-in for nvidia/cuda:13.0.x-runtime: the CUDA libraries a llava-server binary loads (cuBLAS, cuRAND,
# the CUDA runtime) from the devel stand-in, on the plain Debian base. The driver (libcuda.so.1) comes, as
# with the real image, from the NVIDIA container toolkit of a GPU host.
ARG DEVEL_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${DEVEL_IMAGE} AS cuda
FROM ${BASE_IMAGE}
COPY --from=cuda /usr/local/cuda/lib/libcublas.so.13 /usr/local/cuda/lib/libcublasLt.so.13 \
     /usr/local/cuda/lib/libcurand.so.10 /usr/local/cuda/lib/libcudart.so.13 /usr/local/cuda/lib64/
RUN echo /usr/local/cuda/lib64 > /etc/ld.so.conf.d/cuda.conf && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
