pub fn run(_ctx: &crate::Ctx, _report: &mut crate::report::Report) -> anyhow::Result<()> { anyhow::bail!("todo") }
