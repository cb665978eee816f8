"""What a user reads in the Prefect UI's logs of the data stages: no bytecode disassembly."""

from prefect import flow

from pipeline_config import PipelineConfig
from tests.conftest import tiny_config_dict


def flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs reach the server from a background worker

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def test_data_stages_log_no_bytecode_under_log_prints(small_squad_file, tmp_path, prefect_harness):
    from tasks.format_tokenize import format_and_tokenize
    from tasks.load_squad import load_squad
    from tasks.stage import Run

    config = PipelineConfig.model_validate(tiny_config_dict(small_squad_file, tmp_path / "s"))

    @flow(log_prints=True)  # as the finetune flow is: prints become Prefect logs
    def data_stages():
        print("a print of our own is still logged")
        run = Run(config=config, state_dir=str(tmp_path / "s"))
        format_and_tokenize(run, load_squad(run))

    state = data_stages(return_state=True)
    assert state.is_completed()
    messages = flow_logs(state.state_details.flow_run_id)
    assert "a print of our own is still logged" in messages
    bytecode = [m for m in messages if any(op in m for op in ("LOAD_GLOBAL", "PRECALL", "RESUME"))]
    assert not bytecode, bytecode[:5]
