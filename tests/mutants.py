"""Named mutants: deliberate one-line bugs the suite must catch.

Each mutant is a bug someone could plausibly write, in the engine loop or in a
promise the server makes, together with the tests that must fail when it is applied.
tests/test_mutants.py applies each one to a temporary copy of the project and runs
those tests there; a mutant the tests let through fails the suite. A mutant whose
`original` text no longer occurs exactly once in its file also fails, so the list
keeps up with the code. How to add one, and mutmut for the pure modules:
docs/testing.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # text that occurs exactly once in `path`
    mutated: str  # what replaces it
    tests: tuple[str, ...]  # pytest node ids or files; at least one must fail
    more: tuple[tuple[str, str], ...] = ()  # further (original, mutated) edits of the same file

    def __str__(self) -> str:
        return self.name


MUTANTS: tuple[Mutant, ...] = (
    # --- GPU memory (backend/memory/planner.py, backend/memory/savers.py, the server's submit)
    Mutant(
        'the inverted latents of every timestep kept on the GPU',
        'backend/method/engine.py',
        '            store=b.to_host)',
        '            store=None)',
        ('tests/test_memory.py::test_a_cuda_plan_keeps_the_inverted_latents_in_host_memory',),
    ),
    Mutant(
        '--memory auto takes the dearest savers first',
        'backend/memory/planner.py',
        '    for combination in usable:\n        if combination["peak_bytes"] <= budget_bytes:',
        '    for combination in reversed(usable):\n        if combination["peak_bytes"] <= budget_bytes:',
        ('tests/test_memory.py::test_memory_auto_takes_the_cheapest_savers_that_fit',),
    ),
    Mutant(
        'the text encoder left on the GPU during sampling',
        'backend/memory/text_encoder.py',
        '        move(text_encoder, host)\n',
        '',
        ('tests/test_text_encoder.py::test_the_text_encoder_never_shares_the_gpu_with_the_denoiser',),
    ),
    Mutant(
        'the embedding cache keyed without the negative prompt',
        'backend/method/embeddings.py',
        '"source": source, "target": target, "negative": negative}',
        '"source": source, "target": target}',
        ('tests/test_text_encoder.py::test_known_prompts_never_load_the_text_encoder',),
    ),
    Mutant(
        "a slow convolution's columns leave out the batch (the CPU plan's scratch term)",
        'backend/memory/cpu_terms.py',
        '        return input_shape[0] * input_shape[1] * kernel * math.prod(output_shape[2:]) * element_size',
        '        return input_shape[1] * kernel * math.prod(output_shape[2:]) * element_size',
        ('tests/test_memory_rss.py::test_columns_of_a_slow_convolution_by_hand',),
    ),
    Mutant(
        'the server queues a job too big for its GPU instead of refusing it',
        'backend/server/requests.py',
        '            if not self._planned(parsed):\n                return queue_job()',
        '            if True:\n                return queue_job()',
        ('tests/test_memory_server.py::test_the_server_refuses_what_cannot_fit_before_queueing',),
    ),
    Mutant(
        'the server makes a memory plan on its socket loop, holding up every other client',
        'backend/server/planning.py',
        '        self._todo.put(work)\n        return True',
        '        self._hold(threading.Event())\n        work.outcome = work.make()\n        return True',
        ('tests/test_memory_server.py::test_a_plan_holds_up_nobody_but_its_own_request',),
    ),
    Mutant(
        "Wan's gradient checkpointing drops group offload's hook after guidance",
        'backend/backbones/base.py',
        '                block.forward = forward  # back to group offload\'s hook',
        '                del block.forward',
        ('tests/test_memory_savers.py::test_group_offload_hooks_survive_gradient_checkpointing_on_wan',),
    ),
    Mutant(
        "the embedding cache keyed without the text encoder's float8 storage",
        'backend/method/embeddings.py',
        '"dtype": str(dtype), "fp8": fp8,',
        '"dtype": str(dtype),',
        ('tests/test_text_encoder.py::test_text_encoder_fp8_embeds_in_float8_and_keeps_its_own_cache_entries',),
    ),
    Mutant(
        "fp8 casting's model-dtype weights swapped back to float8 from under backward",
        'backend/memory/savers.py',
        '    torch.__future__.set_overwrite_module_params_on_conversion(True)\n    try:',
        '    torch.__future__.set_overwrite_module_params_on_conversion(before)\n    try:',
        ('tests/test_memory_savers.py::test_the_guidance_gradient_flows_through_the_savers',),
    ),
    Mutant(
        "the denoiser keeps its float8 weights after an edit with denoiser_fp8",
        'backend/memory/savers.py',
        '            if originals is not None:\n                _restore(denoiser, originals)',
        '            if originals is not None:\n                pass',
        ('tests/test_memory_savers.py::test_fp8_casting_backpropagates_and_moves_the_frames_by_its_rounding',),
    ),
    Mutant(
        'the VAE offload leaves the VAE on the GPU while sampling',
        'backend/memory/savers.py',
        '            if "vae_offload" in wanted:\n                move(vae, host)',
        '            if "vae_offload" in wanted:\n                pass',
        ('tests/test_memory_savers.py::test_the_offloads_keep_each_network_on_the_gpu_only_while_it_works',),
    ),
    Mutant(
        'tiles that skip their overlap',
        'backend/backbones/wan.py',
        '        stride = self.vae_tile_pixels - self.vae_tile_overlap',
        '        stride = self.vae_tile_pixels',
        ('tests/test_memory_savers.py::test_vae_tiling_matches_whole_frames_within_its_blend',),
    ),
    Mutant(
        "ZeroScope's tiles that skip their overlap",
        'backend/backbones/zeroscope.py',
        '        vae.tile_overlap_factor = self.vae_tile_overlap / self.vae_tile_pixels',
        '        vae.tile_overlap_factor = 0.0',
        ('tests/test_memory_savers.py::test_zeroscope_vae_tiling_is_each_tiles_own_decode_blended_over_the_overlap',),
    ),
    Mutant(
        "ZeroScope's checkpointing leaves transformer_in's activations alive through the backward",
        'backend/backbones/zeroscope.py',
        '    parts: list[torch.nn.Module] = [unet.transformer_in]',
        '    parts: list[torch.nn.Module] = []',
        ('tests/test_memory_savers.py::test_zeroscope_checkpointing_recomputes_each_part_once_in_backward',),
    ),
    # --- the job server's promises (backend/server/, shared/protocol.py, shared/client.py)
    Mutant(
        'job files are written in place, not to a temporary name',
        'backend/server/store.py',
        '    temporary = path.with_name(path.name + ".tmp")',
        '    temporary = path',
        ('tests/test_store.py::test_every_job_file_is_written_to_a_temporary_name_fsynced_and_renamed',),
    ),
    Mutant(
        'job files are renamed into place without fsync',
        'backend/server/store.py',
        '        os.fsync(file.fileno())\n    os.replace(temporary, path)',
        '        pass\n    os.replace(temporary, path)',
        ('tests/test_store.py::test_every_job_file_is_written_to_a_temporary_name_fsynced_and_renamed',),
    ),
    Mutant(
        "a job's inputs are written after the status that names them",
        'backend/server/store.py',
        '            (folder / "input").mkdir(parents=True)\n            for index, frame in enumerate(frames):\n                atomic_write(folder / "input" / f"{index:05d}.png", frame)\n            fsync_dir(folder / "input")\n',
        '            (folder / "input").mkdir(parents=True)\n            self._write_status(job)\n            for index, frame in enumerate(frames):\n                atomic_write(folder / "input" / f"{index:05d}.png", frame)\n            fsync_dir(folder / "input")\n',
        ('tests/test_store.py::test_inputs_and_request_are_on_disk_before_the_status_that_names_them', 'tests/test_store.py::test_a_job_interrupted_while_being_created_is_never_listed',),
    ),
    Mutant(
        "under CURVE, any authorised key may act on another key's job",
        'backend/server/book.py',
        '        if job is None or (job.owner is not None and job.owner != owner):',
        '        if job is None:',
        ('tests/test_server.py::test_with_keys_a_job_belongs_to_the_key_that_submitted_it',),
    ),
    Mutant(
        'a clean stop counts the interrupted attempt',
        'backend/server/book.py',
        'attempts=job.attempts - 1)',
        'attempts=job.attempts)',
        ('tests/test_server.py::test_a_clean_stop_requeues_the_running_job_and_results_are_pruned_as_jobs_finish',),
    ),
    Mutant(
        'finished results are pruned only at start-up',
        'backend/server/book.py',
        '            ledger.running.discard(job_id)\n            self._prune(ledger)',
        '            ledger.running.discard(job_id)',
        ('tests/test_server.py::test_a_clean_stop_requeues_the_running_job_and_results_are_pruned_as_jobs_finish',),
    ),
    Mutant(
        'a store failure while finishing a job kills the worker',
        'backend/server/book.py',
        '                self._back_to_queue(ledger, job, attempt_counts=False)\n                return False',
        '                raise',
        ('tests/test_server_faults.py::test_the_server_survives_a_failing_disk_and_resumes_by_itself',),
    ),
    Mutant(
        "the client hears a job's end before the store has it",
        'backend/server/job_thread.py',
        '        if self.book.finish(job.job_id, state, error, frame_count):\n            log.info("Job %s %s.", job.job_id, state)\n            notify(event)',
        '        notify(event)\n        if self.book.finish(job.job_id, state, error, frame_count):\n            log.info("Job %s %s.", job.job_id, state)',
        ('tests/test_server_faults.py::test_the_server_survives_a_failing_disk_and_resumes_by_itself',),
    ),
    Mutant(
        'submit skips the per-job pixel budget',
        'backend/server/requests.py',
        '            check_pixel_budget(frames_used, size,',
        '            (lambda *_: None)(frames_used, size,',
        ('tests/test_server.py::test_a_decompression_bomb_is_refused_before_decoding',),
    ),
    Mutant(
        'the worker decodes every frame, not only those the job uses',
        'backend/server/frames.py',
        "        picked = PngClip([self.images[index] for index in chosen], self.source).png_bytes()",
        "        picked = PngClip(self.images, self.source).png_bytes()",
        ('tests/test_server.py::test_only_the_frames_a_job_uses_are_decoded', 'tests/test_store.py::test_a_job_input_is_decoded_only_where_the_settings_pick',),
    ),
    Mutant(
        'a reply to a client whose pipe is full is dropped (issue 17)',
        'backend/server/transport.py',
        '        self._keep(routing_id, peer, frames, reply=True)',
        '        self._try_send(routing_id, frames, header.get("type"))',
        ('tests/test_transport.py::test_a_lagging_client_gets_every_reply_and_final_event_and_the_newest_progress',),
    ),
    Mutant(
        'a result with a missing frame is fetched short (issue 17)',
        'backend/server/store.py',
        '            raise DamagedResult(f"frame {index + 1} of {len(digests)}, {name}, is missing or "\n                                "unreadable") from None',
        '            continue',
        ('tests/test_store.py::test_a_result_with_a_missing_or_changed_frame_is_an_error_never_a_shorter_result',),
    ),
    Mutant(
        'a damaged job is deleted instead of quarantined',
        'backend/server/store.py',
        '                self._quarantine(folder, str(damage))',
        '                shutil.rmtree(folder, ignore_errors=True)',
        ('tests/test_store.py::test_damaged_jobs_are_quarantined_never_deleted_and_the_store_loads', 'tests/test_server_faults.py::test_a_damaged_store_rebuilds_what_it_can_and_quarantines_the_rest',),
    ),
    Mutant(
        'a status file of the wrong JSON shape stops the loader',
        'backend/server/store.py',
        '        except (OSError, ValueError, KeyError, TypeError) as damage:  # status.json only',
        '        except (OSError, ValueError) as damage:  # status.json only',
        ('tests/test_server_faults.py::test_a_damaged_store_rebuilds_what_it_can_and_quarantines_the_rest',),
    ),
    Mutant(
        'job ids read from disk are trusted',
        'backend/server/store.py',
        '            job = Job(job_id=check_job_id(request["job_id"]),',
        '            job = Job(job_id=request["job_id"],',
        ('tests/test_store.py::test_damaged_jobs_are_quarantined_never_deleted_and_the_store_loads',),
        more=(('        if job.job_id != folder.name:', '        if False:'),),
    ),
    Mutant(
        "a message's frames are all kept before its limits are checked",
        'backend/server/transport.py',
        '                protocol.check_message_limits(count - 1, total, self.limits,\n                                              protocol.max_payload_frames(self.limits))',
        '                pass',
        ('tests/test_server.py::test_a_flood_of_frames_is_refused_without_being_kept',),
    ),
    Mutant(
        'job lists follow the routing id, not the CURVE key',
        'backend/server/book.py',
        '                    if (job.owner == owner if owner is not None else job.client == client)]',
        '                    if job.client == client]',
        ('tests/test_server.py::test_with_keys_a_job_belongs_to_the_key_that_submitted_it',),
    ),
    Mutant(
        'NaN is written into JSON',
        'shared/protocol.py',
        'allow_nan=False',
        'allow_nan=True',
        ('tests/test_protocol.py::test_encode_refuses_numbers_that_are_not_json', 'tests/test_server.py::test_numbers_that_are_not_json_and_broken_text_are_refused_with_their_req',),
    ),
    Mutant(
        'NaN and Infinity are read from JSON',
        'shared/protocol.py',
        '        header = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)',
        '        header = json.loads(text)',
        ('tests/test_protocol.py::test_decode_refuses_headers_that_are_not_strict_json', 'tests/test_server.py::test_numbers_that_are_not_json_and_broken_text_are_refused_with_their_req',),
    ),
    Mutant(
        'a job may ask for a reply larger than the limits',
        'shared/protocol.py',
        '    check_reply_size(settings, limits)\n\n\ndef check_reply_size',
        '    pass\n\n\ndef check_reply_size',
        ('tests/test_server.py::test_numbers_that_are_not_json_and_broken_text_are_refused_with_their_req',),
    ),
    Mutant(
        'text with lone surrogates is accepted',
        'shared/protocol.py',
        '    json_text(header)  # lone',
        '    pass  # lone',
        ('tests/test_protocol.py::test_decode_refuses_headers_that_are_not_strict_json',),
    ),
    Mutant(
        'an error about a broken header carries no req',
        'shared/protocol.py',
        '        found = _REQ_FIELD.search(bytes(frame[:MAX_HEADER_BYTES * 2]))',
        '        found = None',
        ('tests/test_protocol.py::test_peek_req_finds_the_request_number_of_a_broken_header', 'tests/test_server.py::test_numbers_that_are_not_json_and_broken_text_are_refused_with_their_req',),
    ),
    Mutant(
        'the client ignores an error that carries no req',
        'shared/client.py',
        '"job_id" not in header and wanted_req:',
        '"job_id" not in header and False:',
        ('tests/test_server.py::test_the_client_surfaces_an_error_that_carries_no_req',),
    ),
    Mutant(
        'the client sends a header over the size limit',
        'shared/client.py',
        '        if len(frames[0]) > protocol.MAX_HEADER_BYTES:',
        '        if False:',
        ('tests/test_server.py::test_numbers_that_are_not_json_and_broken_text_are_refused_with_their_req',),
    ),
    Mutant(
        'a failed submit leaves a half-written job folder',
        'backend/server/store.py',
        '        except OSError as error:\n            shutil.rmtree(folder, ignore_errors=True)',
        '        except OSError as error:\n            pass',
        ('tests/test_store.py::test_accepted_is_only_said_once_the_job_is_on_disk',),
    ),
    Mutant(
        'an unwritable state folder ends in a traceback',
        'backend/server/store.py',
        '            self._probe()\n        except OSError as error:\n            raise StoreUnavailable(\n                f"Cannot use',
        '            self._probe()\n        except ZeroDivisionError as error:\n            raise StoreUnavailable(\n                f"Cannot use',
        ('tests/test_server_faults.py::test_a_state_folder_that_cannot_be_written_is_one_sentence_at_start', 'tests/test_store.py::test_an_unwritable_state_folder_is_one_sentence',),
    ),
    Mutant(
        'client ids go into the log raw',
        'backend/server/transport.py',
        '    return "".join(chr(b) if 0x21',
        '    return routing_id.decode("latin-1") or "".join(chr(b) if 0x21',
        ('tests/test_protocol.py::test_client_ids_in_the_log_cannot_forge_lines', 'tests/test_server.py::test_log_lines_cannot_be_forged_through_a_client_id',),
    ),
    Mutant(
        'any host name starting with 127. counts as loopback',
        'backend/server/security.py',
        '    if host == "localhost":',
        '    if host == "localhost" or host.startswith("127."):',
        ('tests/test_protocol.py::test_loopback_addresses',),
    ),
    Mutant(
        'a remote transfer never prints its job id',
        'backend/edit.py',
        '    say(f"Job {job_id}: submitted;',
        '    (lambda _: None)(f"Job {job_id}: submitted;',
        ('tests/test_server.py::test_remote_transfer_writes_the_same_files_as_a_local_run',),
    ),
    Mutant(
        '--job-id does not re-attach to a job',
        'backend/edit.py',
        '        known = remote.job_id is not None and client.status(job_id)',
        '        known = False',
        ('tests/test_server.py::test_a_remote_transfer_re_attaches_to_its_job_by_id',),
    ),
    # --- the sidecar: what the engine used, as the engine, the CLI and the panel report it
    Mutant(
        "the sidecar records the requested guided count, not the one used",
        "backend/method/engine.py",
        "            guided_steps=route.guided_steps,",
        "            guided_steps=settings.guided_steps,",
        ("tests/test_engine.py::test_result_shape_sidecar_and_seed",
         "tests/test_blender_e2e.py::test_trimmed_movie_strip_round_trip"),
    ),
    Mutant(
        "the panel's summary shows the requested guided count, not the one used",
        "blender_addon/rules/messages.py",
        '             f"{record.steps} steps{preview}, {record.guided_steps} guided",',
        '             f"{record.steps} steps{preview}, {record.settings.get(\'guided_steps\')} guided",',
        # Only the end-to-end test: the whole summary of a real job must catch it.
        ("tests/test_blender_e2e.py::test_trimmed_movie_strip_round_trip",),
    ),
    # --- preview and final (issue 27)
    Mutant(
        "the cache hook stays on during a guided step",
        "backend/method/engine.py",
        "step_cache(route.step_cache and not guided and len(windows) == 1)",
        "step_cache(route.step_cache and len(windows) == 1)",
        ("tests/test_quality.py::test_the_step_cache_is_on_only_around_unguided_steps_never_during_guidance",),
    ),
    Mutant(
        "the final re-inverts the clip",
        "backend/method/engine.py",
        '"inversion_steps": settings.inversion_steps, "steps": settings.steps,',
        '"inversion_steps": settings.inversion_steps, "steps": settings.steps,'
        ' "quality": settings.quality,',
        ("tests/test_quality.py::test_a_preview_then_the_final_invert_once_and_count_what_the_plan_says",),
    ),
    # --- the engine loop (backend/method/engine.py) and its pure helpers
    Mutant(
        "guidance climbs the loss instead of descending it",
        "backend/method/engine.py",
        "scaler.scale(loss).backward()",
        "scaler.scale(-loss).backward()",
        ("tests/test_engine.py::test_the_engines_guidance_step_lowers_the_pairwise_smm_loss",),
    ),
    Mutant(
        "the denoising step gets the unguided latent",
        "backend/method/engine.py",
        "latent = self.guide(latent, timestep,",
        "self.guide(latent, timestep,",
        ("tests/test_engine.py::test_guided_steps_change_the_result_and_denoising_gets_the_guided_latent",),
    ),
    Mutant(
        "no step is guided",
        "backend/method/engine.py",
        "                if guided:\n",
        "                if False:\n",
        ("tests/test_engine.py::test_guided_steps_change_the_result_and_denoising_gets_the_guided_latent",),
    ),
    Mutant(
        "the restart step is skipped",
        "backend/method/engine.py",
        "restarts = route.restart and not is_last",
        "restarts = False",
        ("tests/test_engine.py::test_restart_costs_two_more_unet_passes_per_step_and_changes_the_result",),
    ),
    Mutant(
        "every take gets the first take's noise",
        "backend/method/engine.py",
        'generators = [torch.Generator("cpu").manual_seed(take.seed) for take in takes]',
        'generators = [torch.Generator("cpu").manual_seed(takes[0].seed) for take in takes]',
        ("tests/test_takes.py::test_two_prompts_by_two_seeds_give_four_takes_each_its_single_edit",),
    ),
    Mutant(
        "an unseeded edit always uses seed 0",
        "backend/method/engine.py",
        "random.SystemRandom().randrange(2**31)",
        "0",
        ("tests/test_engine.py::test_seed_is_random_unless_given_and_always_recorded",),
    ),
    Mutant(
        "the sidecar records the requested seed, not the one used",
        "backend/method/engine.py",
        '            seed=seed,',
        '            seed=settings.seed,',
        ("tests/test_engine.py::test_seed_is_random_unless_given_and_always_recorded",),
    ),
    Mutant(
        "guidance never scales the loss before backward",
        "backend/method/engine.py",
        "enabled=self._scales_loss())",
        "enabled=False)",
        ("tests/test_engine.py::test_guidance_scales_the_loss_before_backward_where_fp16_gradients_could_underflow",),
    ),
    # --- the backbones (backend/backbones/) and the seam in the engine
    Mutant(
        "a Wan clip of a length that is not 4k + 1 is not padded",
        "backend/backbones/wan.py",
        "return -(-(frames - 1) // factor) * factor + 1",
        "return frames",
        ("tests/test_backbones.py::test_shapes_of_encode_decode_embed_predict_and_taps",),
    ),
    Mutant(
        "Wan's CFG takes the target prompt's velocity for the negative one's",
        "backend/backbones/wan.py",
        "return self.predict(latent, timestep, negative), target_out",
        "return target_out, self.predict(latent, timestep, negative)",
        ("tests/test_backbones.py::test_a_plain_wan_edit_equals_diffusers_wan_pipeline[t2v]",),
    ),
    Mutant(
        "Wan decodes normalised latents without undoing the normalisation",
        "backend/backbones/wan.py",
        "self.vae.decode(z / inverse_std + mean, return_dict=False)",
        "self.vae.decode(z, return_dict=False)",
        ("tests/test_backbones.py::test_a_plain_wan_edit_equals_diffusers_wan_pipeline[t2v]",),
    ),
    Mutant(
        "the flow restart stays at the next level",
        "backend/backbones/flow_matching.py",
        "restart_renoise(latent, float(sigmas[index + 1]), float(sigmas[index]), fresh)",
        "restart_renoise(latent, float(sigmas[index + 1]), float(sigmas[index + 1]), fresh)",
        ("tests/test_backbones.py::test_restart_re_noises_the_next_level_back_to_the_steps_own",),
    ),
    Mutant(
        "Wan ignores the guidance_block setting",
        "backend/backbones/wan.py",
        "self.guidance_block = settings.guidance_block",
        "pass",
        ("tests/test_backbones.py::test_wan_guides_the_block_its_setting_names_and_stops_after_it",),
    ),
    Mutant(
        "init noise still starts from the inverted source's low frequencies",
        "backend/method/engine.py",
        'if settings.init == "noise":',
        "if False:",
        ("tests/test_backbones.py::test_a_plain_zeroscope_edit_equals_diffusers_text_to_video_pipeline",),
    ),
    Mutant(
        "the sidecar does not name the backbone",
        "backend/method/engine.py",
        "            backbone=self.backbone.facts.name,",
        "",
        ("tests/test_backbones.py::test_a_wan_edit_of_a_length_that_is_not_4k_plus_1_returns_every_frame",),
    ),
    Mutant(
        "window blend weights are not normalised",
        "backend/method/windows.py",
        "return raw / total",
        "return raw",
        ("tests/test_windows.py",),
    ),
    Mutant(
        "window blend weights are flat instead of falling off toward the edges",
        "backend/method/windows.py",
        "return min(frame - start + 1, end - frame)",
        "return 1",
        ("tests/test_windows.py",),
    ),
    Mutant(
        "a cache hit does not count as a use",
        "backend/method/inversion.py",
        "os.utime(path)  # most recently used",
        "pass",
        ("tests/test_engine.py::test_inversion_cache_keeps_the_most_recently_used_files_within_its_cap",),
    ),
    Mutant(
        "the guided part is a fixed 20 steps",
        "shared/settings.py",
        "return self.steps - int(self.steps * (1 - self.guided_fraction))",
        "return 20",
        ("tests/test_settings.py::test_the_guided_part_is_the_references_fraction_of_the_steps",),
    ),
    Mutant(
        "pairwise loss compares the differences with the wrong sign",
        "backend/method/guidance.py",
        "source_diffs = source[None, :, :] - source[:, None, :]",
        "source_diffs = source[:, None, :] - source[None, :, :]",
        ("tests/test_guidance.py",),
    ),
    # --- the extension: its own backend and Make Room (blender_addon/)
    Mutant(
        "a lock whose process is gone (or is no backend) is trusted",
        "blender_addon/connection/lock.py",
        "    if lock is not None and is_backend_process(lock.pid):",
        "    if lock is not None:",
        ("tests/test_local_backend.py::test_a_stale_lock_is_removed_and_claimed_again",),
    ),
    Mutant(
        "Make Room moves only the grade, not what is above it",
        "blender_addon/rules/channels.py",
        "moving = {other.name: other for other in over if other.span.channel >= floor}",
        "moving = {other.name: other for other in over if other.span.channel == floor}",
        ("tests/test_blender_rules.py::test_make_room_moves_the_grade_and_everything_above_it_over_the_frames_up_one",),
    ),
    Mutant(
        "Make Room lets a moved strip land on the one above it",
        "blender_addon/rules/channels.py",
        "                moving[other.name] = other\n                grown = True",
        "                grown = False",
        ("tests/test_blender_rules.py::test_make_room_also_moves_what_a_moved_strip_would_land_on",),
    ),
    Mutant(
        "a script's Collect Results fails when Cancel has already ended a job still queued",
        "blender_addon/interface/operators.py",
        "        if not addon.BATCHED:\n            return True\n        if jobs.any_job(",
        "        if jobs.any_job(",
        ("tests/test_blender_e2e.py::test_cancel_a_job_still_queued",),
    ),
    # --- takes in Blender (issue 27, blender_addon/rules/takes.py)
    Mutant(
        "Next Take stops at the last take instead of going round",
        "blender_addon/rules/takes.py",
        "    return order[(order.index(visible) + step) % len(order)]",
        "    return order[min(max(order.index(visible) + step, 0), len(order) - 1)]",
        ("tests/test_blender_takes.py::test_next_and_previous_step_round_the_stack",),
    ),
    Mutant(
        "Render Final's replacement is no undo step of its own (one undo drops the stack)",
        "blender_addon/job_flow/jobs.py",
        '    addon.push_undo(f"Understudy: take {take} as a preview")\n',
        "",
        ("tests/test_blender_e2e.py::test_takes_land_as_one_stack_switch_and_render_final_in_place[5.0]",),
    ),
    Mutant(
        "a take already in the stack is fetched and placed again",
        "blender_addon/rules/takes.py",
        "if number is not None and number not in placed)",
        "if number is not None)",
        ("tests/test_blender_takes.py::test_takes_to_fetch_names_the_ready_takes_not_yet_placed",),
    ),
    # --- regions (issue 20, backend/method/regions.py, backend/method/engine.py)
    Mutant(
        "the feather blurs the grown region outward, past its edge",
        "backend/method/regions.py",
        "    return box_blur(erode(grown, radius), radius).clamp_(0, 1)",
        "    return box_blur(grown, radius).clamp_(0, 1)",
        ("tests/test_regions.py::test_feather_ramps_inside_the_grown_region_and_is_exactly_zero_outside",
         "tests/test_regions.py::test_a_moving_region_keeps_the_plate_and_the_edit_inside_it"),
    ),
    Mutant(
        "the masked SMM averages every cell, not the region's",
        "backend/method/regions.py",
        "    weights = weights.to(features.dtype)",
        "    weights = torch.ones_like(weights, dtype=features.dtype)",
        ("tests/test_regions.py::test_masked_smm_hand_values",
         "tests/test_regions.py::test_two_regions_give_two_loss_terms_each_read_from_its_own_cells"),
    ),
    Mutant(
        "the sampled latent is never blended with the source's inverted latent",
        "backend/method/engine.py",
        "        if regions is None or regions.latent is None:\n            return latent",
        "        if True:\n            return latent",
        ("tests/test_regions.py::test_outside_the_region_the_sampled_latent_is_the_source_latent_exactly",),
    ),
    Mutant(
        "the plate's whole counts are kept in uint8 whatever the feather (a wide one wraps)",
        "backend/method/regions.py",
        "                     if divisor <= torch.iinfo(t).max)",
        "                     if True)",
        ("tests/test_regions.py::test_prepare_regions_frame_by_frame_equals_the_whole_clip_bit_for_bit",),
    ),
    Mutant(
        "the engine checks no mask value as it reads the frames",
        "backend/method/engine.py",
        "        for tally in tallies:\n            tally.finish()",
        "        pass",
        ("tests/test_regions.py::test_a_mask_black_in_every_frame_used_is_refused_before_any_model_work",),
    ),
    # --- reference images through Wan VACE (issue 28)
    Mutant(
        "the reference dropped on the way to the model",
        "backend/method/engine.py",
        "conditioning = self.conditioning_for(frames, regions, references, settings)",
        "conditioning = self.conditioning_for(frames, regions, [], settings)",
        ("tests/test_wan_vace.py::test_a_plain_vace_edit_with_a_reference_equals_diffusers_vace_pipeline",),
    ),
    Mutant(
        "VACE's mask inverted: the plate regenerated, the region kept",
        "backend/backbones/wan_vace.py",
        "            mask = generate.to(device, torch.float32)[None, None]",
        "            mask = 1 - generate.to(device, torch.float32)[None, None]",
        ("tests/test_wan_vace.py::test_a_vace_edit_in_a_region_equals_diffusers_with_the_plate_kept_each_step",),
    ),
    Mutant(
        "the reference strength (VACE's conditioning scale) ignored",
        "backend/backbones/wan_vace.py",
        "torch.full((self._context_layers,), float(strength),",
        "torch.full((self._context_layers,), 1.0,",
        ("tests/test_wan_vace.py::test_the_reference_and_its_strength_steer_the_result_and_the_same_reproduces_it",),
    ),
    # --- a gang of GPUs (issue 29): one edit across several processes
    Mutant(
        "a gang's ranks step Adam on their own tokens' share of the gradient (no all-reduce)",
        "backend/edit.py",
        "        engine.gradient_reducer = gang.reduce_gradient\n",
        "        pass\n",
        ("tests/test_gang.py::test_a_two_rank_gang_edits_exactly_as_one_process",),
    ),
    Mutant(
        "a gang's ranks seeded differently",
        "backend/cluster/gang.py",
        "                       job_id, settings, inputs, masks, memory, takes, batch_size, references)",
        '                       job_id, {**settings, "seed": settings["seed"] + rank}, inputs, masks,\n'
        "                       memory, takes, batch_size, references)",
        ("tests/test_gang.py::test_a_gang_job_through_transfer_server_equals_the_single_process_edit",),
    ),
    Mutant(
        "a gang's ranks each trust their own inversion cache (one inverts, one waits)",
        "backend/cluster/gang.py",
        "            self.engine.cache = AgreedCache(self.engine.cache, self.member)\n",
        "            pass\n",
        ("tests/test_gang.py::test_a_rank_without_the_cached_inversion_makes_every_rank_invert",),
    ),
    Mutant(
        "rank 1 of a gang writes the result",
        "backend/gang.py",
        "        return self.rank == 0\n",
        "        return self.rank == 1\n",
        ("tests/test_gang.py::test_a_job_of_several_takes_runs_on_the_whole_gang_and_rank_0_ships_each_take",),
    ),
    # --- regions (issue 20): the server's mask checks, the extension's layer over the source
    Mutant(
        "a region white over every frame is queued: no plate would be kept",
        "backend/server/frames.py",
        '            tally.finish()\n        except BadMaskError as error:  # the engine',
        '            pass\n        except BadMaskError as error:  # the engine',
        ("tests/test_server.py::test_bad_masks_are_refused_in_one_sentence_before_queueing",),
    ),
    Mutant(
        "the Blender result lays the composite itself over the source (the edge mixed twice)",
        "blender_addon/vse/pngio.py",
        "    out[..., :3] = np.clip(np.rint(layer), 0, 255).astype(np.uint8)",
        "    out[..., :3] = composite[..., :3]",
        ("tests/test_blender_rules.py::test_the_layer_over_the_source_gives_the_servers_composite",),
    ),
    # --- takes on the wire (issue 27): what a cancel keeps, what a restart makes again
    Mutant(
        "a cancel mid-takes drops the takes already made",
        "backend/server/book.py",
        "            elif take not in job.takes_done:\n",
        "            elif take not in job.takes_done or job.state == JobState.CANCELLED:\n",
        ("tests/test_server_takes.py::test_a_cancel_after_the_first_take_keeps_it_and_stops_the_rest",),
    ),
    Mutant(
        "a restart makes the finished takes again",
        "backend/server/job_thread.py",
        "        done = self.book.takes_done(job.job_id)\n",
        "        done: list[int] = []\n",
        ("tests/test_server_takes.py::test_a_server_killed_mid_takes_keeps_the_finished_take_and_makes_only_the_rest",),
    ),
    Mutant(
        "a peer accepts any protocol version",
        "shared/protocol.py",
        "if type(version) is not int or version != PROTOCOL_VERSION:",
        "if False:",
        ("tests/test_protocol.py",),
    ),
    Mutant(
        "JSON true is taken as protocol version 1 (issue 17)",
        "shared/protocol.py",
        "if type(version) is not int or version != PROTOCOL_VERSION:",
        "if version != PROTOCOL_VERSION:",
        ("tests/test_protocol.py",),
    ),
)
