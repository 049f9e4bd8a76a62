"""Real clients against a running `kiem serve`: the official `openai` package, and the chat page
in headless Chromium (Selenium). Run by crates/kiem/tests/serve.rs, which starts the server and
passes KIEM_URL, KIEM_API_KEY and KIEM_MODEL; the browser test runs when KIEM_CHROMIUM and
KIEM_CHROMEDRIVER name the browser and its driver.
"""
import os
import sys
import time
import unittest

import openai
from openai import OpenAI

URL = os.environ["KIEM_URL"]
KEY = os.environ["KIEM_API_KEY"]
MODEL = os.environ["KIEM_MODEL"]
MESSAGES = [
    {"role": "system", "content": "You answer customers."},
    {"role": "user", "content": "Where is order 7?"},
]


class OpenAIClient(unittest.TestCase):
    def setUp(self):
        self.client = OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0)

    def test_models(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertEqual(ids, [MODEL])
        self.assertEqual(self.client.models.retrieve(MODEL).id, MODEL)

    def test_chat_plain_and_streamed_agree(self):
        args = dict(model=MODEL, messages=MESSAGES, max_tokens=16, seed=5, temperature=0.9)
        plain = self.client.chat.completions.create(**args)
        choice = plain.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertLessEqual(plain.usage.completion_tokens, 16)
        self.assertEqual(plain.usage.total_tokens, plain.usage.prompt_tokens + plain.usage.completion_tokens)

        stream = self.client.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True}
        )
        pieces, finish, usage = [], None, None
        for chunk in stream:
            self.assertEqual(chunk.object, "chat.completion.chunk")
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    pieces.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        self.assertEqual("".join(pieces), choice.message.content)
        self.assertEqual(finish, choice.finish_reason)
        self.assertEqual(usage.completion_tokens, plain.usage.completion_tokens)

    def test_completions(self):
        done = self.client.completions.create(
            model=MODEL, prompt="Line 3: the customer", max_tokens=7, extra_body={"ignore_eos": True}
        )
        self.assertEqual(done.object, "text_completion")
        self.assertEqual(done.choices[0].finish_reason, "length")
        self.assertEqual(done.usage.completion_tokens, 7)
        streamed = self.client.completions.create(
            model=MODEL, prompt="Line 3: the customer", max_tokens=7, stream=True,
            extra_body={"ignore_eos": True}, seed=2,
        )
        self.assertTrue(len([c for c in streamed if c.choices and c.choices[0].text]) >= 1)

    def test_errors(self):
        with self.assertRaises(openai.NotFoundError) as caught:
            self.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        self.assertEqual(caught.exception.code, "model_not_found")
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.completions.create(model=MODEL, prompt="x" * 3000)
        self.assertEqual(caught.exception.code, "context_length_exceeded")
        with self.assertRaises(openai.BadRequestError):
            self.client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=9)

    def test_auth(self):
        wrong = OpenAI(base_url=URL + "/v1", api_key="not-the-key", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            wrong.models.list()


@unittest.skipUnless(os.environ.get("KIEM_CHROMIUM"), "no Chromium (KIEM_CHROMIUM unset)")
class ChatPage(unittest.TestCase):
    def test_streamed_chat_in_the_browser(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        options = webdriver.ChromeOptions()
        options.binary_location = os.environ["KIEM_CHROMIUM"]
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-quic"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options,
                                  service=Service(executable_path=os.environ["KIEM_CHROMEDRIVER"]))
        try:
            driver.set_page_load_timeout(30)
            wait = WebDriverWait(driver, 30)
            driver.get(URL + "/")
            driver.find_element(By.ID, "api-key").send_keys(KEY)
            driver.find_element(By.ID, "system").send_keys("You answer customers.")
            # Greedy decoding, so the page's reply is the same on every run.
            driver.execute_script(
                "const t = document.getElementById('temperature'); t.value = '0';"
                "t.dispatchEvent(new Event('input'));"
            )
            # A tiny model answers in milliseconds; a slow link (DevTools throttling, 3 kB/s)
            # makes the stream arrive in pieces, so the page must show text as it comes.
            driver.set_network_conditions(offline=False, latency=5, download_throughput=3000,
                                          upload_throughput=1_000_000)
            for turn, question in enumerate(["Where is order 7?", "And order 8?"], start=1):
                # Count the updates of the reply as it streams in.
                driver.execute_script(
                    "window.updates = 0; new MutationObserver((records) => {"
                    "  for (const r of records) for (const n of r.addedNodes)"
                    "    if (n.classList && n.classList.contains('assistant'))"
                    "      new MutationObserver(() => window.updates++).observe(n, {childList: true, characterData: true, subtree: true});"
                    "}).observe(document.getElementById('messages'), {childList: true});"
                )
                box = driver.find_element(By.ID, "input")
                box.send_keys(question)
                driver.find_element(By.ID, "send").click()
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == turn)
                replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                self.assertEqual(len(replies), turn)
                errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.error")]
                self.assertEqual(errors, [])
                text = replies[-1].text
                self.assertTrue(text.strip(), "the reply is empty")
                updates = driver.execute_script("return window.updates")
                self.assertGreaterEqual(updates, 2, f"the reply arrived in one piece, not streamed: {text!r}")
            users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user")]
            self.assertEqual(users, ["Where is order 7?", "And order 8?"])
            self.assertTrue(driver.find_element(By.ID, "stop").get_attribute("disabled"))
        finally:
            driver.quit()


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
