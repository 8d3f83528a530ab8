// What the frontend does with the client generated from /api/v1/schema (openapi-typescript 7 +
// openapi-fetch). tests/test_api_contract.py generates schema.d.ts beside this file and runs
// `tsc --strict --noEmit`: if the schema drifts from what callers rely on, this stops compiling.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema";

type ApiError = components["schemas"]["ErrorResponse"]["error"];

const client = createClient<paths>({
  baseUrl: "http://localhost:8000",
  headers: { Authorization: "Api-Key ak_example_secret" },
});

function explain(error: ApiError): string {
  const field = error.details["field"];
  return `${error.code}: ${error.message}${typeof field === "string" ? ` (${field})` : ""}`;
}

export async function castAndRender(photo: Blob): Promise<number> {
  // Create a character: only `name` is required.
  const created = await client.POST("/api/v1/characters", { body: { name: "Kai", tags: ["lead"] } });
  if (created.error) {
    throw new Error(explain(created.error.error));
  }
  const characterId: number = created.data.id;

  // List with filters and pagination; every query parameter is optional.
  const listed = await client.GET("/api/v1/characters", {
    params: { query: { archived: false, page_size: 20, ordering: "-created_at" } },
  });
  if (listed.error) {
    throw new Error(explain(listed.error.error));
  }
  const names: string[] = listed.data.results.map((character) => character.name);
  const total: number = listed.data.count;

  // Search by photo without `limit` (it has a server default).
  const found = await client.POST("/api/v1/search/faces", {
    body: { image: "photo.jpg" },
    bodySerializer: () => {
      const form = new FormData();
      form.append("image", photo, "photo.jpg");
      return form;
    },
  });
  if (found.error) {
    throw new Error(explain(found.error.error));
  }
  const best = found.data.results[0];
  const similarity: number | undefined = best?.similarity;

  // Ask what it would cost: `?dry_run=true` answers the estimate and the budget's verdict, no job.
  const quoted = await client.POST("/api/v1/generations", {
    params: { query: { dry_run: true } },
    body: { character: characterId, prompt: "on a rooftop at dusk" },
  });
  if (quoted.error) {
    throw new Error(explain(quoted.error.error));
  }
  if ("allowed" in quoted.data && !quoted.data.allowed) {
    const cost: string = quoted.data.estimate.cost;
    throw new Error(`${cost} USD is over budget: ${quoted.data.refusal ? explain(quoted.data.refusal) : ""}`);
  }

  // Submit a generation with the required fields only: method, size, negative_prompt and
  // num_images have defaults.
  const submitted = await client.POST("/api/v1/generations", {
    body: { character: characterId, prompt: "on a rooftop at dusk" },
    params: { header: { "Idempotency-Key": "render-kai-1" } },
  });
  if (submitted.error) {
    // 402 budget_exceeded, 409 idempotency_key_reused, 422 no_identity, 429 too_many_jobs, ...: one envelope.
    throw new Error(explain(submitted.error.error));
  }
  const submittedJob = submitted.data;
  if (!("status" in submittedJob)) {
    throw new Error("a quote, not a job"); // the operation's other 2xx body (dry runs) is told apart here
  }
  const status: "queued" | "running" | "succeeded" | "failed" | "canceled" = submittedJob.status;

  const job = await client.GET("/api/v1/generations/{id}", { params: { path: { id: submittedJob.id } } });
  if (job.error) {
    throw new Error(explain(job.error.error));
  }
  console.log(names, total, similarity, status, job.data.progress);
  return submittedJob.id;
}
