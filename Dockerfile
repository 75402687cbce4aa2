# PubG1 broker and loadgen. Build stage needs clang/libclang for the rocksdb crate.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends clang libclang-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p pubg1-broker -p loadgen \
 && cp target/release/pubg1-broker target/release/loadgen /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/pubg1-broker /usr/local/bin/loadgen /usr/local/bin/
COPY loadgen/scenarios /scenarios
ENTRYPOINT ["pubg1-broker"]
