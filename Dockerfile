# Shoal's image: the `shoal` binary and exactly the shared libraries it links, on an
# empty base, so building it pulls nothing. tools/build-image.sh prepares the build
# context (rootfs/: the binary, the libraries `ldd` lists, the dynamic loader) and runs
# `docker build` with this file.
FROM scratch
COPY rootfs/ /

# Volumes are mounted at /srv/shoal/volumes/NAME (as lsyncd_swarm's
# /srv/lsyncd_swarm/volumes/NAME); the index and packs live on their own volume at
# /var/lib/shoal; credentials are Docker secrets ca.pem, cert.pem and key.pem.
ENV SHOAL_DATA_ROOT=/srv/shoal/volumes \
    SHOAL_STATE_DIR=/var/lib/shoal \
    SHOAL_CREDENTIALS=/run/secrets \
    SHOAL_HTTP=127.0.0.1:7030 \
    SHOAL_REQUIRE_MOUNTS=true \
    MODE=swarm \
    HEARTBEAT=25
VOLUME ["/var/lib/shoal"]
EXPOSE 7029/udp

# `docker stop` sends SIGTERM: serve stops its tasks and flushes the index before it
# exits (it handles the signal itself as PID 1; `--init` works as well).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/shoal", "health"]
ENTRYPOINT ["/usr/local/bin/shoal"]
CMD ["serve"]
