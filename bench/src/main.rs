fn main() -> anyhow::Result<()> {
    s3spot_bench::main()
}
